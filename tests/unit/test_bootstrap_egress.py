"""The egress strategies with fakes: policy-route (the default) never writes the main table, direct
changes nothing, and the private hook that marks botocore's sockets is where the pinned botocore keeps it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from bootstrap.egress import policy_route
from bootstrap.egress.policy_route import MARK, RULE_PRIORITY, SO_MARK, TABLE
from bootstrap.route_model import RTPROT_EIP_RECLAIM, Route, Rule
from tests.unit.test_bootstrap_fakes import AL2023_TABLE, IFINDEX, SELF, Rig

MARKED = (socket.SOL_SOCKET, SO_MARK, MARK)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def _policy(rig: Rig, **overrides: Any) -> str:
    return rig.config(egress="policy-route", **overrides)


def test_policy_route_claims_without_ever_writing_the_main_table(rig: Rig) -> None:
    seen: list[tuple[list[Route], list[Rule], list[Route]]] = []
    rig.ec2.before_call = lambda op: seen.append(
        (rig.netlink.routes(254), rig.netlink.rules(), rig.netlink.routes(TABLE))
    )
    assert rig.main(config=_policy(rig)) == 0
    assert rig.ec2.address["InstanceId"] == SELF
    # Not one route change in the main table, no pins: only the private table and the rule.
    assert all(route.table == TABLE for _, route in rig.netlink.calls)
    for main, rules, private in seen:
        assert main == AL2023_TABLE
        assert any(r.priority == RULE_PRIORITY and r.fwmark == MARK and r.table == TABLE for r in rules)
        assert private == [
            Route(
                dst="0.0.0.0/0",
                gateway="10.0.0.4",
                oif=IFINDEX,
                prefsrc="10.0.0.10",
                table=TABLE,
                proto=RTPROT_EIP_RECLAIM,
            )
        ]
    # Afterwards: the rule and the table are gone, and so is the journal.
    assert rig.netlink.routes(TABLE) == []
    assert not any(r.table == TABLE for r in rig.netlink.rules())
    assert not Path(rig.journal.path).exists()


def test_policy_route_marks_every_api_client_made_while_it_is_in_place(rig: Rig) -> None:
    assert rig.main(config=_policy(rig)) == 0
    assert MARKED in rig.ec2.socket_options
    assert MARKED in rig.autoscaling.socket_options  # CONTINUE goes out through the detour


def test_policy_route_is_journaled_before_the_rule_exists(rig: Rig) -> None:
    journaled: list[dict[str, Any]] = []

    def record(command: str, route: Route) -> None:
        journaled.append(json.loads(Path(rig.journal.path).read_text()))

    rig.netlink.on_change = record
    assert rig.main(config=_policy(rig)) == 0
    policy = journaled[0]["policy"]
    assert policy["rule"] == {"priority": RULE_PRIORITY, "table": TABLE, "fwmark": MARK, "fwmask": 0xFFFFFFFF}
    assert policy["route"]["gateway"] == "10.0.0.4"


def test_a_killed_policy_route_run_is_undone_by_the_next(rig: Rig) -> None:
    state = policy_route.PolicyJournal(
        ifindex=IFINDEX,
        nat="10.0.0.4",
        rule=Rule(priority=RULE_PRIORITY, table=TABLE, fwmark=MARK),
        route=Route(dst="0.0.0.0/0", gateway="10.0.0.4", oif=IFINDEX, prefsrc="10.0.0.10", table=TABLE),
    )
    rig.journal.write({"policy": state.to_json()})
    rig.netlink.add_rule(state.rule)
    rig.netlink.table.append(state.route)
    rig.ec2.address["InstanceId"] = SELF
    rig.imds.identity_value = rig.imds.identity_value.__class__(
        **{**rig.imds.identity_value.__dict__, "public_ipv4": "198.51.100.7"}
    )
    assert rig.main(config=_policy(rig)) == 0
    assert rig.netlink.routes(TABLE) == []
    assert not any(r.table == TABLE for r in rig.netlink.rules())
    assert rig.netlink.table == AL2023_TABLE


def test_a_rule_and_table_left_without_a_journal_are_removed_first(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.netlink.add_rule(Rule(priority=RULE_PRIORITY, table=TABLE, fwmark=MARK))
    left = Route(dst="0.0.0.0/0", gateway="10.0.0.99", oif=IFINDEX, table=TABLE, proto=RTPROT_EIP_RECLAIM)
    rig.netlink.table.append(left)
    assert rig.main(config=_policy(rig)) == 0
    assert "left by an earlier run with no journal; removing it first" in capsys.readouterr().err
    assert rig.netlink.routes(TABLE) == []


# Another's route in the private table: kept. Before the payload marked its routes with a protocol of its
# own, every route of table 57776 was taken for one of its own and deleted.
FOREIGN = Route(dst="10.99.0.0/16", gateway="10.0.0.1", oif=IFINDEX, table=TABLE, proto=4)


def test_another_route_in_the_private_table_survives_a_run(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.netlink.table.append(FOREIGN)
    assert rig.main(config=_policy(rig)) == 0
    assert rig.netlink.routes(TABLE) == [FOREIGN]
    assert "no journal" not in capsys.readouterr().err
    assert ("delete", FOREIGN) not in rig.netlink.calls


def test_another_route_in_the_private_table_survives_the_recovery_of_a_killed_run(rig: Rig) -> None:
    # What a run killed mid-claim leaves: its journal, its rule and its route, beside another's route.
    rule = Rule(priority=RULE_PRIORITY, table=TABLE, fwmark=MARK)
    ours = Route(
        dst="0.0.0.0/0",
        gateway="10.0.0.4",
        oif=IFINDEX,
        prefsrc="10.0.0.10",
        table=TABLE,
        proto=RTPROT_EIP_RECLAIM,
    )
    state = policy_route.PolicyJournal(ifindex=IFINDEX, nat="10.0.0.4", rule=rule, route=ours)
    rig.journal.write({"policy": state.to_json()})
    rig.netlink.add_rule(rule)
    rig.netlink.table += [FOREIGN, ours]
    assert rig.main(config=_policy(rig)) == 0
    assert rig.netlink.routes(TABLE) == [FOREIGN]


def test_another_default_route_in_the_private_table_is_never_overwritten(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=IFINDEX, table=TABLE, proto=4)
    rig.netlink.table.append(theirs)
    assert rig.main(config=_policy(rig)) == 75
    assert rig.netlink.routes(TABLE) == [theirs]
    assert f"routes: table {TABLE} holds 0.0.0.0/0 via 10.0.0.1" in capsys.readouterr().err
    assert rig.ec2.calls == []


def test_a_rule_removed_during_the_claim_is_put_back_before_the_next_call(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    from botocore.exceptions import EndpointConnectionError

    def networkd_reconfigures(op: str) -> None:
        # systemd-networkd removing "foreign" rules on a reconfigure, as the first call fails.
        if rig.ec2.calls == ["DescribeAddresses"]:
            rig.netlink.rule_list[:] = [r for r in rig.netlink.rule_list if r.table != TABLE]

    rig.ec2.errors["DescribeAddresses"] = [EndpointConnectionError(endpoint_url="https://ec2")]
    rig.ec2.before_call = networkd_reconfigures
    assert rig.main(config=_policy(rig)) == 0
    assert "had gone; put back" in capsys.readouterr().err
    assert rig.ec2.address["InstanceId"] == SELF
    assert not any(r.table == TABLE for r in rig.netlink.rules())


def test_a_source_rule_cannot_take_the_marked_connection_elsewhere(rig: Rig) -> None:
    # amazon-ec2-net-utils' per-interface rule at 10000: behind the payload's rule at 100.
    rig.netlink.add_rule(Rule(priority=10000, table=10000, src="10.0.0.10/32"))
    rig.netlink.table.append(Route(dst="0.0.0.0/0", gateway="10.0.0.1", oif=IFINDEX, table=10000))
    assert rig.main(config=_policy(rig)) == 0


def test_a_mark_rule_ahead_of_the_payloads_stops_the_run_naming_it(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.netlink.add_rule(Rule(priority=50, table=254, fwmark=MARK))
    rig.netlink.table.append(Route(dst="203.0.113.0/24", gateway="10.0.0.1", oif=IFINDEX, table=254))
    assert rig.main(config=_policy(rig)) == 75
    assert rig.ec2.calls == []
    assert "rule 50" in capsys.readouterr().err
    assert rig.netlink.routes(TABLE) == []


def test_direct_changes_nothing_on_the_host(rig: Rig) -> None:
    assert rig.main(config=rig.config(egress="direct", nat_by_subnet=None)) == 0
    assert rig.netlink.calls == [] and rig.netlink.rule_calls == []
    assert rig.ec2.address["InstanceId"] == SELF


def test_the_mark_hook_is_where_the_pinned_botocore_keeps_socket_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real botocore client: the option reaches urllib3's socket setup for every new connection."""
    import botocore.session
    from botocore.config import Config
    from urllib3.util import connection

    # Port 9 of loopback refuses at once: the socket is made and its options set, then nothing is sent.
    client = botocore.session.Session().create_client(
        "ec2",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=Config(retries={"total_max_attempts": 1}),
    )
    policy_route.mark_connections(client, MARK)
    applied: list[Any] = []
    monkeypatch.setattr(
        connection, "_set_socket_options", lambda sock, options: applied.extend(options or [])
    )
    from botocore.exceptions import EndpointConnectionError

    with pytest.raises(EndpointConnectionError):
        client.describe_regions()
    assert MARKED in applied


def test_a_botocore_without_the_hook_stops_the_run_in_one_line() -> None:
    from bootstrap.errors import TransientError

    with pytest.raises(TransientError, match="use egress main-table"):
        policy_route.mark_connections(object(), MARK)


def test_dualstack_without_ipv6_for_the_endpoint_exits_75_at_once_sending_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # aws-facts: facts-ec2-dualstack-endpoint
    from types import SimpleNamespace

    def no_ipv6(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NODATA, "No address associated with hostname")

    monkeypatch.setattr(socket, "getaddrinfo", no_ipv6)
    rig.ec2.meta = SimpleNamespace(  # type: ignore[attr-defined]
        endpoint_url="https://ec2.ap-southeast-2.api.aws", config=SimpleNamespace(use_dualstack_endpoint=True)
    )
    hook = {"auto_scaling_group": "svc-asg", "hook": "svc-launch", "timeout_seconds": 30}
    config = rig.config(egress="direct", dualstack=True, nat_by_subnet=None, lifecycle_hook=hook)
    assert rig.main(config=config) == 75
    err = capsys.readouterr().err
    assert "the dual-stack EC2 endpoint ec2.ap-southeast-2.api.aws has no IPv6 address" in err
    assert rig.ec2.calls == [] and rig.autoscaling.completed == [] and rig.clock.slept == []
    assert "their timeouts decide" in err
