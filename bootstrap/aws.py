"""botocore clients: models loaded early in the background, clients (and connections) made late."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Optional

from bootstrap.imds import Credentials
from bootstrap.interrupts import interruptible

if TYPE_CHECKING:
    from botocore.session import Session
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_cloudwatch import CloudWatchClient
    from mypy_boto3_ec2 import EC2Client

LOG = logging.getLogger(__name__)

# The API is a few hundred milliseconds away through the NAT; a connection that takes longer than this
# is not coming, and the retry loop (not botocore) decides what happens next.
CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 10.0
# Reports (lifecycle, signal, metrics) are retried by their own loop, a few quick tries through the
# detour: a short timeout lets a second try go out before the restore.
LIFECYCLE_CONNECT_TIMEOUT_SECONDS = 2.0
LIFECYCLE_READ_TIMEOUT_SECONDS = 5.0


def disable_imds_v1() -> None:
    """botocore's own IMDS use (credentials, region) must never fall back to IMDSv1 either."""
    os.environ["AWS_EC2_METADATA_V1_DISABLED"] = "true"


class ClientFactory:
    """Loads botocore and the service models on a background thread while IMDS and routes are read.

    Loading botocore and the EC2 model costs a few hundred milliseconds of CPU; doing it while waiting
    on IMDS hides most of it. No client (so no connection) is made until `ec2()` / `autoscaling()` is
    called, which the run does only once the detour is in place.
    """

    def __init__(self, region: str) -> None:
        self._region = region
        self._session: Optional[Session] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._load, name="botocore-preload", daemon=True)

    def start(self) -> ClientFactory:
        self._thread.start()
        return self

    def _load(self) -> None:
        try:
            import botocore.session  # noqa: PLC0415 (deliberately late: see the class docstring)
            from botocore.config import Config  # noqa: PLC0415

            session = botocore.session.Session()
            # A throwaway client with placeholder credentials loads the model, the endpoint rules and
            # the client class once (the session caches them); making a client opens no connection.
            session.create_client(
                "ec2",
                region_name=self._region,
                aws_access_key_id="preload",
                aws_secret_access_key="preload",
                config=Config(retries={"total_max_attempts": 1}),
            )
            self._session = session
        except Exception as err:  # noqa: BLE001 (re-raised on the main thread by session())
            self._error = err

    def session(self) -> Session:
        with interruptible():
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._session is not None
        return self._session

    def _client(
        self,
        service: str,
        endpoint_url: Optional[str],
        credentials: Optional[Credentials],
        connect_timeout: float,
        read_timeout: float,
    ) -> Any:
        from botocore.config import Config  # noqa: PLC0415

        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Our own loop retries, with the deadline and the detour check in view.
            retries={"total_max_attempts": 1, "mode": "standard"},
            user_agent_extra="eip-reclaim",
        )
        kwargs: dict[str, Any] = {}
        if credentials is not None:
            # Explicit credentials: botocore never goes to IMDS for them during the detour.
            kwargs = {
                "aws_access_key_id": credentials.access_key,
                "aws_secret_access_key": credentials.secret_key,
                "aws_session_token": credentials.token,
            }
        return self.session().create_client(
            service, region_name=self._region, endpoint_url=endpoint_url, config=config, **kwargs
        )

    def ec2(self, endpoint_url: Optional[str], credentials: Optional[Credentials]) -> EC2Client:
        client: EC2Client = self._client(
            "ec2", endpoint_url, credentials, CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS
        )
        return client

    def autoscaling(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> AutoScalingClient:
        client: AutoScalingClient = self._client(
            "autoscaling",
            endpoint_url,
            credentials,
            LIFECYCLE_CONNECT_TIMEOUT_SECONDS,
            LIFECYCLE_READ_TIMEOUT_SECONDS,
        )
        return client

    def cloudformation(
        self, endpoint_url: Optional[str], credentials: Optional[Credentials]
    ) -> CloudFormationClient:
        client: CloudFormationClient = self._client(
            "cloudformation",
            endpoint_url,
            credentials,
            LIFECYCLE_CONNECT_TIMEOUT_SECONDS,
            LIFECYCLE_READ_TIMEOUT_SECONDS,
        )
        return client

    def cloudwatch(self, endpoint_url: Optional[str], credentials: Optional[Credentials]) -> CloudWatchClient:
        client: CloudWatchClient = self._client(
            "cloudwatch",
            endpoint_url,
            credentials,
            LIFECYCLE_CONNECT_TIMEOUT_SECONDS,
            LIFECYCLE_READ_TIMEOUT_SECONDS,
        )
        return client
