"""Balancer options: validated on construction, with errors that name the bad value."""

from __future__ import annotations

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.options import DEFAULT_CHANNEL_OPTIONS, BalancerOptions


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"selector": "fastest"}, "fastest"),
        ({"selector": 3}, "3"),
        ({"panic_threshold": 150}, "panic_threshold"),
        ({"panic_threshold": -1}, "panic_threshold"),
        ({"key_header": "LB-Key"}, "LB-Key"),
        ({"key_header": ""}, "key_header"),
        ({"wait_timeout": -0.5}, "wait_timeout"),
        ({"drain_timeout": float("nan")}, "drain_timeout"),
        ({"latency_decay": 0}, "latency_decay"),
        ({"retry": "always"}, "always"),
        ({"health_check": True}, "health_check"),
        ({"outlier_detection": 5}, "outlier_detection"),
        ({"channel_options": ["grpc.max_send_message_length"]}, "channel_options"),
        ({"credentials": "tls"}, "credentials"),
        ({"service": ""}, "service"),
        ({"retries": 3}, "retries"),
    ],
)
def test_bad_options_raise_config_error_naming_them(kwargs, needle):
    with pytest.raises(lbkit.ConfigError, match=needle):
        BalancerOptions(**kwargs)


def test_balancers_reject_bad_options_and_bad_discovery_alike():
    for cls in (lbkit.Balancer, lbkit.aio.Balancer):
        with pytest.raises(lbkit.ConfigError, match="fastest"):
            cls(["127.0.0.1:1"], selector="fastest")
        with pytest.raises(lbkit.ConfigError, match="str"):
            cls("127.0.0.1:1")
        with pytest.raises(lbkit.ConfigError, match="empty"):
            cls([])
        with pytest.raises(lbkit.ConfigError, match="bad endpoint address"):
            cls(["127.0.0.1"])
        with pytest.raises(lbkit.ConfigError, match="duplicate"):
            cls(["127.0.0.1:1", "127.0.0.1:1"])
        with pytest.raises(TypeError):
            cls(["127.0.0.1:1"], retries=3)  # an unknown keyword of the constructor itself


def test_retry_policy_validation():
    with pytest.raises(lbkit.ConfigError, match="max_attempts"):
        lbkit.RetryPolicy(max_attempts=0)
    with pytest.raises(lbkit.ConfigError, match="OK"):
        lbkit.RetryPolicy(retryable_codes=[grpc.StatusCode.OK])
    with pytest.raises(lbkit.ConfigError, match="retryable_codes"):
        lbkit.RetryPolicy(retryable_codes=grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(lbkit.ConfigError, match="attempt_timeout"):
        lbkit.RetryPolicy(attempt_timeout=0)
    assert lbkit.RetryPolicy(retryable_codes=()).retryable_codes == frozenset()


def test_channel_options_keep_defaults_unless_overridden():
    opts = BalancerOptions(
        channel_options=[("grpc.max_reconnect_backoff_ms", 1000), ("grpc.lb_policy_name", "x")]
    )
    names = [name for name, _ in opts.channel_options]
    assert names.count("grpc.max_reconnect_backoff_ms") == 1
    assert ("grpc.max_reconnect_backoff_ms", 1000) in opts.channel_options
    for name, value in DEFAULT_CHANNEL_OPTIONS:
        if name != "grpc.max_reconnect_backoff_ms":
            assert (name, value) in opts.channel_options


def test_selector_by_name_or_instance_and_latency_decay_reach_the_core():
    lb = lbkit.Balancer(["127.0.0.1:1"], selector=lbkit.LeastConnections(choices=3), latency_decay=2.5)
    assert lb.selector == lbkit.LeastConnections(choices=3)
    assert lb.stats.decay == 2.5
    assert lbkit.Balancer(["127.0.0.1:1"], selector="peak_ewma").selector.name == "peak_ewma"
