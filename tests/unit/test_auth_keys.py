"""The pieces of authentication that need no process: keys and tokens from the environment, the keyring's verdicts,
the per-client reservation bookkeeping, status bounds, the engine's Authorization and the start-up warning."""

from __future__ import annotations

import logging
import re

import pytest

from flexlb.domain import ErrorCode
from flexlb.http.auth import ANONYMOUS, Api, Keyring, Refusal, bearer, fingerprint, is_loopback, warn_if_open
from flexlb.proxy.auth import UpstreamAuth
from flexlb.reservation_owners import OwnerRefused, ReservationOwners
from flexlb.settings import AuthSettings, ConfigError, load_settings, parse_auth_settings
from flexlb.state.codec import STATUS_FIELDS
from flexlb.status_bounds import BOUNDS, check_status, check_status_text

AUTH = AuthSettings(api_keys=("sk-a", "sk-b"), schedule_tokens=("s-1",), admin_tokens=("adm",))


def test_keys_come_from_the_environment_or_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "admin"
    secret.write_text("adm-from-file\n")
    env = {"FLEXLB_API_KEYS": " sk-a, sk-b ", "FLEXLB_ADMIN_TOKEN_FILE": str(secret), "FLEXLB_ENGINE_API_KEY": "e"}
    auth = load_settings(env).auth
    assert auth.api_keys == ("sk-a", "sk-b") and auth.admin_tokens == ("adm-from-file",)
    assert auth.engine_api_key == "e" and auth.schedule_tokens == ()
    assert "sk-a" not in repr(auth) and "adm-from-file" not in repr(load_settings(env))
    assert load_settings({}).auth == AuthSettings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLEXLB_API_KEYS": "a,,b"}, "FLEXLB_API_KEYS (environment): an empty key"),
        ({"FLEXLB_API_KEYS": "has space"}, "key 1 holds a space"),
        (
            {"FLEXLB_API_KEYS": "k-one", "FLEXLB_ADMIN_TOKEN": "k-one"},
            "FLEXLB_ADMIN_TOKEN: a key is also in FLEXLB_API_KEYS",
        ),
        ({"FLEXLB_ADMIN_TOKEN": "x-secret", "FLEXLB_ADMIN_TOKEN_FILE": "/f"}, "set FLEXLB_ADMIN_TOKEN or"),
        ({"FLEXLB_ADMIN_TOKEN_FILE": "/nonexistent/secret"}, "cannot read '/nonexistent/secret'"),
        ({"FLEXLB_ENGINE_API_KEYS": '{"10.0.0.1": "k-two"}'}, "has no port"),
        ({"FLEXLB_ENGINE_API_KEYS": '["k-three"]'}, "expected a JSON object"),
    ],
)
def test_a_bad_key_setting_names_the_variable_but_not_the_secret(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        parse_auth_settings(env)
    secrets = [v for k, v in env.items() if not k.endswith("_FILE")]
    assert not any(secret in str(err.value) for secret in secrets), err.value


def test_bearer_takes_only_the_bearer_scheme() -> None:
    assert bearer("Bearer k") == "k" and bearer("bearer  k ") == "k"
    assert bearer(None) is None and bearer("Basic k") is None and bearer("Bearer ") is None and bearer("k") is None


def test_the_keyring_tells_missing_wrong_foreign_and_right_keys_apart() -> None:
    keyring = Keyring(AUTH)
    assert keyring.check(Api.PROXY, "Bearer sk-b") == fingerprint("sk-b") != fingerprint("sk-a")
    assert keyring.check(Api.OPEN, None) == ANONYMOUS
    missing = keyring.check(Api.ADMIN, None)
    assert isinstance(missing, Refusal) and (missing.status, missing.openai_code) == (401, None)
    wrong = keyring.check(Api.SCHEDULE, "Bearer nope")
    assert isinstance(wrong, Refusal) and (wrong.status, wrong.code) == (401, ErrorCode.UNAUTHENTICATED)
    foreign = keyring.check(Api.ADMIN, "Bearer sk-a")
    assert isinstance(foreign, Refusal) and (foreign.status, foreign.code) == (403, ErrorCode.PERMISSION_DENIED)
    assert "FLEXLB_API_KEYS" in foreign.message and "sk-a" not in foreign.message
    # An API without keys is open; the others stay closed.
    partial = Keyring(AuthSettings(admin_tokens=("adm",)))
    assert partial.check(Api.PROXY, None) == ANONYMOUS and isinstance(partial.check(Api.ADMIN, None), Refusal)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_owners_cap_each_client_and_release_only_its_own() -> None:
    clock = Clock()
    owners = ReservationOwners(2, check_release=True, clock=clock)
    assert owners.take("a", 1, 1000) and owners.take("a", 2, 1000)
    assert not owners.take("a", 2, 1000)  # the same id again takes no new slot
    with pytest.raises(OwnerRefused) as err:
        owners.take("a", 3, 1000)
    assert err.value.status == 429 and "maxReservationsPerToken" in err.value.message
    with pytest.raises(OwnerRefused) as err:
        owners.take("b", 1, 1000)
    assert err.value.status == 409
    with pytest.raises(OwnerRefused) as err:
        owners.check_may_release("b", 1)
    assert err.value.status == 403
    owners.check_may_release("a", 1)
    owners.give_back("a", 1)
    assert owners.held("a") == 1 and owners.take("a", 3, 1000)
    clock.now += 1.0  # the TTL passed: the reservations expired by themselves, and so did their slots
    assert owners.held("a") == 0 and owners.take("b", 1, 1000)


def test_owners_without_tokens_count_but_do_not_check_releases() -> None:
    owners = ReservationOwners(1, check_release=False, clock=Clock())
    owners.take(ANONYMOUS, 1, 1000)
    owners.check_may_release(ANONYMOUS, 99)  # no identity to compare: releases stay as they were
    with pytest.raises(OwnerRefused):
        owners.take(ANONYMOUS, 2, 1000)


def test_every_status_field_has_a_bound() -> None:
    assert set(BOUNDS) == set(STATUS_FIELDS)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"running": 2**70}, "running: 1180591620717411303424 is out of bounds: expected an integer from 0 to"),
        ({"kv_used": 1e30}, "kv_used: 1e+30 is out of bounds"),
        ({"prefill_tokens_per_ms": float("inf")}, "prefill_tokens_per_ms: inf is out of bounds"),
        ({"prefill_tokens_per_ms": float("nan")}, "prefill_tokens_per_ms: nan is out of bounds"),
        ({"prefill_tokens_per_ms": "12"}, "prefill_tokens_per_ms: expected 0 (not measured) or a finite number"),
        ({"alive": 1}, "alive: expected true or false, got 1"),
        ({"waiting": 2.5}, "waiting: expected an integer"),
        ({"speed": 1}, "unknown status field 'speed'"),
    ],
)
def test_absurd_status_is_refused_naming_field_and_bound(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_status(fields)


def test_sane_status_is_stored_in_its_usual_form() -> None:
    assert check_status({"alive": False, "running": 3, "kv_used": 2048.0, "prefill_tokens_per_ms": 0}) == {
        "alive": "0",
        "running": "3",
        "kv_used": "2048",
        "prefill_tokens_per_ms": "0.0",
    }
    assert check_status_text("alive", "yes") == "1" and check_status_text("running", "7") == "7"
    with pytest.raises(ValueError, match="kv_total: expected an integer"):
        check_status_text("kv_total", "lots")


def test_the_engine_gets_its_own_key_else_the_clients_header() -> None:
    assert UpstreamAuth().header("w:1", None) == b""
    assert UpstreamAuth().header("w:1", "Bearer client") == b"Authorization: Bearer client\r\n"
    assert UpstreamAuth().header("w:1", "Bearer x\r\nHost: evil") == b""
    keyed = UpstreamAuth("default", {"w:2": "two"})
    assert keyed.header("w:1", "Bearer client") == b"Authorization: Bearer default\r\n"
    assert keyed.header("w:2", None) == b"Authorization: Bearer two\r\n"


def test_an_open_admin_api_off_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("router.example")
    with caplog.at_level(logging.WARNING, logger="flexlb.auth"):
        assert warn_if_open(AuthSettings(), [("HTTP", "127.0.0.1")]) == []
        lines = warn_if_open(AuthSettings(), [("HTTP", "0.0.0.0"), ("gRPC", "0.0.0.0")])
    assert any("admin API" in line and "OPEN on 0.0.0.0" in line for line in lines)
    assert sum("gRPC" in line for line in lines) == 1
    assert "SECURITY WARNING" in caplog.text
    assert not any("admin API" in line for line in warn_if_open(AUTH, [("HTTP", "0.0.0.0")]))
