"""REDIS_URL's forms: one Redis, a cluster's seed nodes, a Sentinel set; errors never echo a password."""

from __future__ import annotations

import pytest

from flexlb.settings import ConfigError, load_settings
from flexlb.state.redis_url import RedisUrlError, parse_redis_url


def test_single_urls_pass_through() -> None:
    for url in ("redis://h:1/0", "rediss://:p@h:1/2", "unix:///tmp/r.sock?db=1"):
        assert parse_redis_url(url).kind == "single"


def test_cluster_seeds_and_credentials() -> None:
    target = parse_redis_url("redis+cluster://user:s%40cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    assert target.kind == "cluster" and not target.tls
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (target.username, target.password) == ("user", "s@cret")
    assert "s@cret" not in target.describe() and "10.0.0.2:7001" in target.describe()
    assert parse_redis_url("rediss+cluster://:pw@h:1").tls
    assert parse_redis_url("redis+cluster://pw@h:1").password == "pw"  # as redis-py reads redis://pw@host


def test_sentinel_master_name_db_and_sentinel_password() -> None:
    target = parse_redis_url("redis+sentinel://:data@s1:26379,s2:26379/mymaster/3?sentinel_password=guard")
    assert target.kind == "sentinel" and target.master_name == "mymaster" and target.db == 3
    assert target.nodes == (("s1", 26379), ("s2", 26379))
    assert (target.password, target.sentinel_password) == ("data", "guard")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis+sentinel://s1:26379", "master name"),
        ("redis+cluster://", "at least one host:port"),
        ("redis+cluster://h", "host:port"),
        ("redis+cluster://h:1/3", "database 0"),
        ("redis+sentinel://s:1/m/x", "must be a number"),
        ("http://h:1", "got http"),
    ],
)
def test_bad_urls_name_what_is_wrong(url: str, error: str) -> None:
    with pytest.raises(RedisUrlError, match=error):
        parse_redis_url(url)


def test_settings_accept_cluster_and_sentinel_and_never_echo_a_password() -> None:
    assert load_settings({"REDIS_URL": "redis+cluster://h:1,h:2"}).redis_url == "redis+cluster://h:1,h:2"
    assert load_settings({"REDIS_URL": "redis+sentinel://h:1/m"}).redis_url == "redis+sentinel://h:1/m"
    with pytest.raises(ConfigError) as caught:
        load_settings({"REDIS_URL": "redis+sentinel://:hunter2@h:1"})
    assert "hunter2" not in str(caught.value) and "master name" in str(caught.value)
