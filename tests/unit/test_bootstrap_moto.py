"""The EC2 side against moto, with the payload's own botocore clients; faults injected by event hooks."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from moto import mock_aws

from bootstrap.aws import ClientFactory
from bootstrap.claim import Outcome, Retrier, claim
from bootstrap.clock import Deadline
from bootstrap.errors import Contested, DeadlineExceeded, PermanentError
from tests.unit.test_bootstrap_fakes import FakeClock, FakeImds, FakeNetlink, Rig

REGION = "us-east-1"
EIP = "198.51.100.7"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def _instances(ec2: Any, count: int) -> list[str]:
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    reply = ec2.run_instances(ImageId=image, MinCount=count, MaxCount=count, InstanceType="t3.micro")
    return [i["InstanceId"] for i in reply["Instances"]]


def _address(ec2: Any, holder: str | None) -> str:
    allocation: str = ec2.allocate_address(Domain="vpc", Address=EIP)["AllocationId"]
    if holder:
        ec2.associate_address(AllocationId=allocation, InstanceId=holder)
    return allocation


def _payload_client() -> Any:
    """The EC2 client exactly as the payload makes it (botocore, own timeouts, no botocore retries)."""
    return ClientFactory(REGION).start().ec2(None, None)


def _calls(client: Any) -> list[str]:
    seen: list[str] = []
    client.meta.events.register("before-call.ec2.*", lambda model, **_: seen.append(model.name))
    return seen


def _fail_first(client: Any, operation: str, n: int, code: str, status: int) -> list[int]:
    """The first `n` calls of `operation` answer with `code` before reaching moto."""
    left = [n]

    def inject(**_: Any) -> Any:
        if left[0] <= 0:
            return None
        left[0] -= 1
        body = {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        return SimpleNamespace(status_code=status, headers={}), body

    client.meta.events.register(f"before-call.ec2.{operation}", inject)
    return left


def _retrier(seconds: float = 240) -> Retrier:
    return Retrier(Deadline(FakeClock(), seconds), rng=random.Random(3))


def _holder(ec2: Any, allocation: str) -> str | None:
    address = ec2.describe_addresses(AllocationIds=[allocation])["Addresses"][0]
    return address.get("InstanceId")


def test_reassociation_from_another_instance(aws: Any) -> None:
    me, other = _instances(aws, 2)
    allocation = _address(aws, other)
    client = _payload_client()
    calls = _calls(client)
    assert claim(client, me, allocation, _retrier()) is Outcome.ASSOCIATED
    assert _holder(aws, allocation) == me
    assert calls == ["DescribeAddresses", "DescribeInstances", "AssociateAddress", "DescribeAddresses"]


def test_unassociated_address_is_taken(aws: Any) -> None:
    # aws-facts: facts-describe-addresses
    (me,) = _instances(aws, 1)
    allocation = _address(aws, None)
    assert claim(_payload_client(), me, allocation, _retrier()) is Outcome.ASSOCIATED
    assert _holder(aws, allocation) == me


def test_already_held_makes_no_write(aws: Any) -> None:
    (me,) = _instances(aws, 1)
    allocation = _address(aws, me)
    client = _payload_client()
    calls = _calls(client)
    assert claim(client, me, allocation, _retrier()) is Outcome.ALREADY_HELD
    assert calls == ["DescribeAddresses"]


def test_not_found_is_permanent(aws: Any) -> None:
    # aws-facts: facts-error-allocation-not-found
    (me,) = _instances(aws, 1)
    client = _payload_client()
    calls = _calls(client)
    with pytest.raises(PermanentError, match=r"InvalidAllocationID\.NotFound") as caught:
        claim(client, me, "eipalloc-0123456789abcdef0", _retrier())
    assert caught.value.exit_code == 3
    assert calls == ["DescribeAddresses"]


@pytest.mark.parametrize(("code", "status"), [("UnauthorizedOperation", 403), ("AuthFailure", 401)])
def test_permission_errors_fail_fast(aws: Any, code: str, status: int) -> None:
    me, other = _instances(aws, 2)
    allocation = _address(aws, other)
    client = _payload_client()
    calls = _calls(client)
    _fail_first(client, "AssociateAddress", 1, code, status)
    retrier = _retrier()
    with pytest.raises(PermanentError, match=code) as caught:
        claim(client, me, allocation, retrier)
    assert caught.value.exit_code == 3
    assert calls.count("AssociateAddress") == 1
    assert retrier.deadline.clock.slept == []  # type: ignore[attr-defined]
    assert _holder(aws, allocation) == other


def test_throttling_for_the_first_calls_then_success(aws: Any) -> None:
    # aws-facts: facts-error-throttling
    me, other = _instances(aws, 2)
    allocation = _address(aws, other)
    client = _payload_client()
    calls = _calls(client)
    _fail_first(client, "DescribeAddresses", 3, "RequestLimitExceeded", 503)
    _fail_first(client, "AssociateAddress", 2, "Throttling", 400)
    retrier = _retrier()
    assert claim(client, me, allocation, retrier) is Outcome.ASSOCIATED
    assert _holder(aws, allocation) == me
    assert calls.count("AssociateAddress") == 3
    assert calls.count("DescribeAddresses") == 3 + 1 + 1
    slept = retrier.deadline.clock.slept  # type: ignore[attr-defined]
    assert len(slept) == 5
    print(f"backoff sleeps (jittered): {[round(s, 3) for s in slept]}")


def test_botocore_does_not_retry_on_its_own(aws: Any) -> None:
    """One attempt per call on the wire: our loop, not botocore's, decides (with the deadline in view)."""
    client = _payload_client()
    sent: list[str] = []

    def throttled(request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        sent.append(request.url)
        body = b"<Response><Errors><Error><Code>RequestLimitExceeded</Code></Error></Errors></Response>"
        return AWSResponse(
            request.url, 503, {}, SimpleNamespace(stream=lambda **_: [body], read=lambda: body)
        )

    client.meta.events.register_first("before-send.ec2.DescribeAddresses", throttled)
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="RequestLimitExceeded"):
        client.describe_addresses(AllocationIds=["eipalloc-0123456789abcdef0"])
    assert len(sent) == 1


def test_throttling_past_the_deadline_is_75(aws: Any) -> None:
    # aws-facts: facts-error-throttling
    me, other = _instances(aws, 2)
    allocation = _address(aws, other)
    client = _payload_client()
    _fail_first(client, "DescribeAddresses", 10_000, "RequestLimitExceeded", 503)
    with pytest.raises(DeadlineExceeded, match="RequestLimitExceeded") as caught:
        claim(client, me, allocation, _retrier(seconds=20))
    assert caught.value.exit_code == 75
    assert _holder(aws, allocation) == other


def _group_members(aws: Any) -> tuple[str, str]:
    """Two members of one Auto Scaling group, the second launched later (moto's LaunchTime has 1 s steps)."""
    autoscaling = boto3.client("autoscaling", region_name=REGION)
    image = aws.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    aws.create_launch_template(
        LaunchTemplateName="svc-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"}
    )
    subnet = aws.describe_subnets()["Subnets"][0]["SubnetId"]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="svc-asg",
        LaunchTemplate={"LaunchTemplateName": "svc-lt"},
        MinSize=1,
        MaxSize=2,
        DesiredCapacity=1,
        VPCZoneIdentifier=subnet,
    )
    (older,) = [
        i["InstanceId"] for i in autoscaling.describe_auto_scaling_instances()["AutoScalingInstances"]
    ]
    time.sleep(1.1)
    autoscaling.set_desired_capacity(AutoScalingGroupName="svc-asg", DesiredCapacity=2)
    members = {i["InstanceId"] for i in autoscaling.describe_auto_scaling_instances()["AutoScalingInstances"]}
    (newer,) = members - {older}
    return older, newer


def test_an_older_member_yields_to_a_newer_one(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    older, newer = _group_members(aws)
    allocation = _address(aws, newer)
    client = _payload_client()
    calls = _calls(client)
    assert claim(client, older, allocation, _retrier()) is Outcome.YIELDED
    assert "AssociateAddress" not in calls
    assert _holder(aws, allocation) == newer


def test_a_newer_member_takes_it_from_an_older_one(aws: Any) -> None:
    older, newer = _group_members(aws)
    allocation = _address(aws, older)
    assert claim(_payload_client(), newer, allocation, _retrier()) is Outcome.ASSOCIATED
    assert _holder(aws, allocation) == newer


def test_a_whole_run_through_main_with_the_real_clients(aws: Any, tmp_path: Any) -> None:
    # aws-facts: facts-associate-reassociation
    me, other = _instances(aws, 2)
    allocation = _address(aws, other)
    rig = Rig(tmp=tmp_path, imds=FakeImds(creds=None), netlink=FakeNetlink())
    rig.imds.identity_value = rig.imds.identity_value.__class__(
        me, rig.imds.identity_value.mac, "subnet-0aaa", "10.0.0.0/24", ("10.0.0.0/16",), None
    )
    deps = rig.deps()
    deps.clients = ClientFactory(REGION).start()
    from bootstrap.cli import main

    config = rig.config(allocation_id=allocation, region=REGION, lifecycle_hook=None)
    assert main(["--config", config], deps=deps) == 0
    assert _holder(aws, allocation) == me
    assert rig.netlink.table == FakeNetlink().table


def _taken_right_after_ours(client: Any, aws: Any, allocation: str, by: str, times: int) -> None:
    """Another instance's AssociateAddress lands right after each of ours (the first `times`)."""
    left = [times]

    def steal(**_: Any) -> None:
        if left[0] > 0:
            left[0] -= 1
            aws.associate_address(AllocationId=allocation, InstanceId=by, AllowReassociation=True)

    client.meta.events.register("after-call.ec2.AssociateAddress", steal)


def test_verify_sees_a_newer_member_take_it_and_yields(aws: Any) -> None:
    older, newer = _group_members(aws)
    allocation = _address(aws, None)
    client = _payload_client()
    calls = _calls(client)
    _taken_right_after_ours(client, aws, allocation, newer, times=1)
    retrier = _retrier()
    assert claim(client, older, allocation, retrier) is Outcome.YIELDED
    assert calls == ["DescribeAddresses", "AssociateAddress", "DescribeAddresses", "DescribeInstances"]
    assert _holder(aws, allocation) == newer
    assert retrier.deadline.clock.slept == []  # type: ignore[attr-defined]


def test_verify_sees_another_instance_take_it_and_associates_again(aws: Any) -> None:
    me, other, third = _instances(aws, 3)
    allocation = _address(aws, other)
    client = _payload_client()
    calls = _calls(client)
    _taken_right_after_ours(client, aws, allocation, third, times=1)
    assert claim(client, me, allocation, _retrier()) is Outcome.ASSOCIATED
    assert calls == [
        "DescribeAddresses",
        "DescribeInstances",
        "AssociateAddress",
        "DescribeAddresses",
        "DescribeInstances",
        "AssociateAddress",
        "DescribeAddresses",
    ]
    assert _holder(aws, allocation) == me


def test_verify_gives_up_after_three_reassociations(aws: Any) -> None:
    me, other, third = _instances(aws, 3)
    allocation = _address(aws, other)
    client = _payload_client()
    calls = _calls(client)
    _taken_right_after_ours(client, aws, allocation, third, times=10_000)
    with pytest.raises(Contested, match="associated it 4 times") as caught:
        claim(client, me, allocation, _retrier())
    assert caught.value.exit_code == 75
    assert calls.count("AssociateAddress") == 4
    assert _holder(aws, allocation) == third
