"""Telling the others how the run went: Auto Scaling (lifecycle), CloudFormation (signal), CloudWatch.

Each report is best effort with its own short retries: it never changes what the run did, only who
learns of it. A lifecycle action or signal known to be complete is recorded in the state directory, so
the re-check timer's runs do not send it again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from bootstrap.clients import Clients
from bootstrap.clock import Deadline
from bootstrap.config import Config
from bootstrap.errors import ReclaimError
from bootstrap.imds import Credentials
from bootstrap.interrupts import interruptible
from bootstrap.state import Marks

LOG = logging.getLogger(__name__)

# Through the detour a report gets a few quick tries: the restore waits on them.
DETOUR_ATTEMPTS = 3
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 5.0
# CompleteLifecycleAction and SignalResource have no error code of their own for "nothing is waiting":
# both answer ValidationError, told apart by the message.
NO_ACTION = "No active Lifecycle Action"
NOT_SIGNALABLE = "cannot be signaled"
LIFECYCLE_MARK = "lifecycle"
SIGNAL_MARK = "signal"


class Unanswered(Exception):
    """A report call that did not get through (network, throttling, an unexpected refusal)."""


@dataclass
class Reporter:
    """One run's reports, for one instance."""

    config: Config
    clients: Clients
    marks: Marks
    instance_id: str
    credentials: Callable[[], Optional[Credentials]]
    deadline: Deadline
    rng: random.Random
    # A stop request or the deadline that cut a report short: no report is tried after it.
    stopped: Optional[ReclaimError] = None
    # What the egress in place does to each new client (policy-route marks its connections).
    adopt: Callable[[Any], None] = lambda client: None

    def lifecycle_pending(self) -> bool:
        return self.config.lifecycle_hook is not None and not self.marks.done(
            LIFECYCLE_MARK, self.instance_id
        )

    def _signal_pending(self) -> bool:
        return self.config.signal is not None and not self.marks.done(SIGNAL_MARK, self.instance_id)

    def succeeded(self, *, until_deadline: bool, where: str) -> bool:
        """CONTINUE, then the SUCCESS signal; True when nothing of them is left to send."""
        done = True
        if self.lifecycle_pending():
            sent = self._report(
                "CONTINUE", self._complete, "CONTINUE", until_deadline=until_deadline, where=where
            )
            done = sent is not None
        if self._signal_pending():
            sent = self._report(
                "SUCCESS signal", self._signal, "SUCCESS", until_deadline=until_deadline, where=where
            )
            done = done and sent is not None
        return done

    def warmed(self, *, where: str) -> bool:
        """CONTINUE for a launch into the warm pool; True when nothing is left to send.

        Not recorded as done, and no signal: the same hook fires again when the instance leaves the
        pool, and the stack's creation policy waits for the instance that takes the address.
        """
        if self.config.lifecycle_hook is None:
            return True
        sent = self._report(
            "CONTINUE (warm pool)",
            lambda result: self._complete(result, into_pool=True),
            "CONTINUE",
            until_deadline=True,
            where=where,
        )
        return sent is not None

    def failed(self, *, where: str, signal: bool = True) -> bool:
        """ABANDON, the FAILURE signal (unless `signal` is False: an instance warming up for the pool) and
        the Abandoned metric; True if an ABANDON was accepted.

        A pool instance never signals: a warm pool is refilled during stack updates too, and the stack's
        update policy counts the signals of the instances it waits for; a FAILURE from a pool instance
        would fail (and roll back) the update.
        """
        abandoned = False
        if self.lifecycle_pending():
            abandoned = (
                self._report(
                    "ABANDON", self._complete, "ABANDON", until_deadline=False, where=where, attempts=1
                )
                is True
            )
        if signal and self._signal_pending():
            self._report(
                "FAILURE signal", self._signal, "FAILURE", until_deadline=False, where=where, attempts=1
            )
        if abandoned:
            self.metrics({"Abandoned": (1.0, "Count")}, where=where)
        return abandoned

    def metrics(self, values: dict[str, tuple[float, str]], *, where: str) -> None:
        """Publish `values` (name → (value, unit)) once; a failure is logged, never raised."""
        if self.config.metrics is None:
            return
        metrics = self.config.metrics

        def put(client: Any) -> None:
            client.put_metric_data(
                Namespace=metrics.namespace,
                MetricData=[
                    {
                        "MetricName": name,
                        "Dimensions": [{"Name": "Service", "Value": metrics.service}],
                        "Value": value,
                        "Unit": unit,
                    }
                    for name, (value, unit) in values.items()
                ],
            )

        sent = self._report(
            f"metrics {', '.join(values)}",
            lambda _: self._call("cloudwatch", put),
            "",
            until_deadline=False,
            where=where,
            attempts=1,
        )
        if sent:
            LOG.info("cloudwatch: %s published", ", ".join(f"{k}={v:g}" for k, (v, _) in values.items()))

    def _report(
        self,
        what: str,
        send: Callable[[str], bool],
        argument: str,
        *,
        until_deadline: bool,
        where: str,
        attempts: int = DETOUR_ATTEMPTS,
    ) -> Optional[bool]:
        """Send until answered (`attempts` times, or until the deadline): True if sent, False if nothing
        was waiting for it, None if never answered or cut short by a stop request or the deadline.
        """
        if self.stopped is not None:
            return None
        attempt = 0
        while True:
            attempt += 1
            try:
                with interruptible():
                    return send(argument)
            except Unanswered as err:
                more = attempt < attempts or until_deadline
                delay = self.rng.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))
                if not more or delay >= self.deadline.remaining():
                    LOG.warning("report: %s %s: not sent after %d attempt(s): %s", what, where, attempt, err)
                    return None
                LOG.warning("report: %s %s: %s; retry %d in %d ms", what, where, err, attempt, delay * 1000)
                try:
                    self.deadline.sleep(delay, f"retrying {what}")
                except ReclaimError as stop:
                    self.stopped = stop
            except ReclaimError as stop:
                self.stopped = stop
            if self.stopped is not None:
                LOG.warning("report: %s %s: not sent: %s", what, where, self.stopped)
                return None

    def _complete(self, result: str, *, into_pool: bool = False) -> bool:
        """CompleteLifecycleAction; recorded as done, except on the way into the warm pool (the same hook
        fires again when the instance leaves it)."""
        hook = self.config.lifecycle_hook
        assert hook is not None

        def call(client: Any) -> None:
            client.complete_lifecycle_action(
                LifecycleHookName=hook.hook,
                AutoScalingGroupName=hook.auto_scaling_group,
                LifecycleActionResult=result,
                InstanceId=self.instance_id,
            )

        sent = self._call("autoscaling", call, nothing_waiting=NO_ACTION)
        pool = " (into the warm pool)" if into_pool else ""
        if sent:
            LOG.info("lifecycle: %s sent for %s/%s%s", result, hook.auto_scaling_group, hook.hook, pool)
        else:
            # Every run but the first boot's (reboots, the re-check timer): nothing is waiting.
            LOG.info("lifecycle: no pending launch action for this instance%s; nothing to complete", pool)
        if not into_pool:
            self.marks.mark(LIFECYCLE_MARK, self.instance_id)
        return sent

    def _signal(self, status: str) -> bool:
        signal = self.config.signal
        assert signal is not None

        def call(client: Any) -> None:
            client.signal_resource(
                StackName=signal.stack,
                LogicalResourceId=signal.resource,
                UniqueId=self.instance_id,
                Status=status,
            )

        sent = self._call("cloudformation", call, nothing_waiting=NOT_SIGNALABLE)
        if sent:
            LOG.info("cloudformation: %s signal sent to %s/%s", status, signal.stack, signal.resource)
        else:
            # Outside a create or update of the stack nothing waits for a signal.
            LOG.info("cloudformation: %s is not waiting for a signal; nothing to send", signal.stack)
        self.marks.mark(SIGNAL_MARK, self.instance_id)
        return sent

    def _call(self, service: str, call: Callable[[Any], None], nothing_waiting: str = "") -> bool:
        """Make the client and the call; False if the API said nothing is waiting, Unanswered if no answer."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            client = self._client(service)
        except BotoCoreError as err:
            raise Unanswered(f"{type(err).__name__}: {' '.join(str(err).split())}") from None
        try:
            call(client)
        except ClientError as err:
            error = err.response.get("Error", {})
            if (
                nothing_waiting
                and error.get("Code") == "ValidationError"
                and nothing_waiting in str(error.get("Message", ""))
            ):
                return False
            raise Unanswered(f"{error.get('Code', 'Unknown')}: {error.get('Message', '')}") from None
        except BotoCoreError as err:
            raise Unanswered(f"{type(err).__name__}: {' '.join(str(err).split())}") from None
        finally:
            close = getattr(client, "close", None)
            if callable(close):
                close()
        return True

    def _client(self, service: str) -> Any:
        credentials = self.credentials()
        client: Any
        if service == "autoscaling":
            client = self.clients.autoscaling(self.config.autoscaling_endpoint_url, credentials)
        elif service == "cloudformation":
            client = self.clients.cloudformation(self.config.cloudformation_endpoint_url, credentials)
        else:
            client = self.clients.cloudwatch(self.config.cloudwatch_endpoint_url, credentials)
        self.adopt(client)
        return client
