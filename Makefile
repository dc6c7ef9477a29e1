# One entry point for newcomers and CI. Every target sets up what it needs first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
# The CDK CLI is versioned apart from aws-cdk-lib; this one reads the cloud assembly that the pinned lib writes.
CDK_CLI_VERSION := 2.1148.1

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# No telemetry and no notices fetch: synth must work with no internet.
export CDK_DISABLE_CLI_TELEMETRY := true
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION := 1

STAMP := $(VENV)/.installed
CHECKOV_STAMP := $(VENV)/checkov/.installed
AWSCLI_STAMP := $(VENV)/awscli/.installed

.PHONY: setup synth test lint unit lab-test lab bench clean
.DEFAULT_GOAL := synth

setup: $(STAMP) $(CHECKOV_STAMP) $(AWSCLI_STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@echo "==> creating $(VENV) and installing pinned dependencies"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check pip==26.3
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@echo "==> installing the CDK CLI $(CDK_CLI_VERSION) with the venv's Node.js $$($(VENV)/bin/node --version)"
	$(VENV)/bin/npm install --global --prefix $(VENV) --no-fund --no-audit --loglevel=error aws-cdk@$(CDK_CLI_VERSION)
	@touch $@

# checkov pins boto3 and packaging against requirements-dev.txt: it gets a venv of its own, which
# tests/unit/test_checks.py runs on every synthesized template.
$(CHECKOV_STAMP): requirements-checkov.txt $(STAMP)
	@echo "==> installing checkov into $(VENV)/checkov"
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet --disable-pip-version-check -r requirements-checkov.txt
	@touch $@

# The AWS CLI v1 pins botocore to its own release: a venv of its own too. The NAT boot tests
# (tests/lab/test_nat_boot.py) run the NAT's boot script with it, against moto.
$(AWSCLI_STAMP): requirements-awscli.txt $(STAMP)
	@echo "==> installing the AWS CLI into $(VENV)/awscli"
	$(PYTHON) -m venv $(VENV)/awscli
	$(VENV)/awscli/bin/pip install --quiet --disable-pip-version-check -r requirements-awscli.txt
	@touch $@

## synth: set up, then synthesize every stack of the embedded default configuration into cdk.out/
synth: $(STAMP)
	@t0=$$(date +%s%N); cdk synth --quiet --no-notices && \
	  echo "==> synthesized in $$(( ($$(date +%s%N) - t0) / 1000000 )) ms:" && ls -1 cdk.out/*.template.json

## lint: ruff, formatting, mypy, and the payload's Python 3.9 floor
lint: setup
	ruff check .
	ruff format --check .
	mypy
	vermin --target=3.9- --no-tips --violations --eval-annotations bootstrap

## test: set up, then run lint and every test (the namespace lab skips without root, saying how to run it)
test: lint
	pytest

# The netlink contract's fake half needs no root: it runs with the unit tests (its kernel half skips).
unit: setup
	pytest tests/unit tests/kernel/test_contract_netlink.py

# The lab builds network namespaces: without root, say how to run it instead of failing obscurely.
NEED_ROOT = @if [ "$$(id -u)" != 0 ]; then echo "make $@: needs root and network namespaces: run 'sudo make $@'" >&2; exit 1; fi

## lab-test: the VPC lab's scenarios only (root)
lab-test: setup
	$(NEED_ROOT)
	pytest tests/lab

## lab: build the VPC lab, heal an instance and then a replacement in the other AZ, print the timeline (root)
##      STRATEGY=policy-route (default) | main-table | ipv6 | interface-endpoints
lab: setup
	$(NEED_ROOT)
	python -m tests.lab.demo $(if $(STRATEGY),--strategy $(STRATEGY))

## bench: heal latency, failover downtime and the floor in the VPC lab, as JSON (root)
bench: setup
	$(NEED_ROOT)
	@python -m benchmarks.heal
	@python -m benchmarks.boot

clean:
	rm -rf cdk.out .pytest_cache .mypy_cache .ruff_cache
