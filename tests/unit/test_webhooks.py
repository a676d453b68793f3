"""Webhook signing and the SSRF guard (worker.webhooks), and the JobSpec fields name / labels /
webhook (core.spec), against independent computations: hmac from the standard library, address
classes written out by hand."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from pydantic import ValidationError

from core.spec import MAX_LABELS, JobSpec
from store.settings import Settings
from worker.webhook_guard import WebhookRefused, address_refusal, check_webhook_url
from worker.webhooks import resolve_allowed, sign


def test_signature_is_github_style_hmac_sha256():
    body = b'{"id":"abc","status":"succeeded"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign(body, "s3cret") == f"sha256={expected}"
    assert sign(body + b" ", "s3cret") != sign(body, "s3cret")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged as IPv4
        ("::ffff:10.0.0.1", "private"),
        ("fc00::1", "private"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
    ],
)
def test_non_public_addresses_are_refused(address, reason):
    assert address_refusal(address) == reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"])
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.5/hook",
        "http://[::1]:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:8000/hook",  # a name that resolves to loopback
        "https://[::ffff:127.0.0.1]/hook",
    ],
)
def test_resolve_refuses_private_targets_by_default(url):
    with pytest.raises(WebhookRefused, match="address"):
        check_webhook_url(url, Settings())


def test_allowed_hosts_lift_the_refusal_and_pin_the_address():
    settings = Settings(webhook_allowed_hosts=" LocalHost , 127.0.0.1")
    assert settings.webhook_allowed() == {"localhost", "127.0.0.1"}
    target, host = resolve_allowed("http://localhost:8123/x?y=1", settings)
    assert host == "localhost"
    assert target.host in ("127.0.0.1", "::1") and target.port == 8123 and target.raw_path == b"/x?y=1"
    with pytest.raises(WebhookRefused):  # another loopback name stays refused
        check_webhook_url("http://127.0.0.2/x", settings)


def test_send_time_parsing_is_guarded_too():
    """The sender parses with httpx and checks again: the same refusals at send time."""
    for url in ("http://localhost:1/x", "http://[::1]/x", "http://169.254.169.254/x", "https://10.0.0.1/x"):
        with pytest.raises(WebhookRefused):
            resolve_allowed(url, Settings())


def test_unresolvable_host_is_refused():
    with pytest.raises(WebhookRefused, match="does not resolve"):
        check_webhook_url("http://no-such-host.invalid/hook", Settings())


def test_spec_name_labels_webhook_validation():
    spec = JobSpec(
        name="nightly", labels={"team": "vision", "env/stage": "prod"}, webhook={"url": "https://e.x/h"}
    )
    dumped = spec.model_dump(mode="json")
    assert dumped["name"] == "nightly" and dumped["labels"] == {"team": "vision", "env/stage": "prod"}
    assert dumped["webhook"] == {"url": "https://e.x/h"}
    assert JobSpec().labels == {} and JobSpec().webhook is None and JobSpec().name is None
    bad = [
        {"labels": {"a:b": "c"}},  # ':' separates key and value in ?label=
        {"labels": {"": "c"}},
        {"labels": {"-a": "c"}},
        {"labels": {"k" * 64: "c"}},
        {"labels": {"k": "v" * 201}},
        {"labels": {"k": "line\nbreak"}},
        {"labels": {f"k{i}": "v" for i in range(MAX_LABELS + 1)}},
        {"name": ""},
        {"name": "x" * 201},
        {"webhook": {"url": "ftp://e.x/h"}},
        {"webhook": {"url": "/relative"}},
        {"webhook": {"url": "http://e.x:70000/"}},
        {"webhook": {"url": "http://e .x/"}},
        {"webhook": {}},
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            JobSpec(**fields)
