"""Process configuration: defaults < TOML < AITBC_<PROCESS>_<KEY> environment < explicit overrides;
unknown keys, wrong types and out-of-range values are refused at start with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from aitbc import config
from aitbc.config import CoordinatorConfig, MinerConfig, WalletConfig
from aitbc.errors import InvalidArgument


def test_precedence_defaults_toml_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.toml"
    f.write_text('verify_rate = 0.25\nstall_timeout_s = 30\nquarantine_after = 3\n'
                 '[[clients]]\nid = "ops"\napi_key_sha256 = "ab"\noperator = true\n')
    c = config.load(CoordinatorConfig, f, "COORDINATOR")
    assert (c.verify_rate, c.stall_timeout_s, c.quarantine_after, c.probation_checks) == (0.25, 30.0, 3, 10)
    assert c.clients[0].operator and not config.ClientKey("x", "y").operator
    monkeypatch.setenv("AITBC_COORDINATOR_VERIFY_RATE", "0.5")
    monkeypatch.setenv("AITBC_COORDINATOR_TLS_CA_FILE", "/etc/aitbc/ca.pem")
    c = config.load(CoordinatorConfig, f, "COORDINATOR", stall_timeout_s=5.0)
    assert (c.verify_rate, c.stall_timeout_s, c.tls_ca_file) == (0.5, 5.0, "/etc/aitbc/ca.pem")
    f.write_text('allow_new_models = false\n[[models]]\nname = "tiny-llama"\nkind = "text"\nmax_price_per_unit = 7\n')
    c = config.load(CoordinatorConfig, f, "COORDINATOR")
    assert not c.allow_new_models and c.models == [config.ModelConfig("tiny-llama", "text", 7)]
    m = config.load(MinerConfig, None, "MINER", models="tiny-sd, tiny-llama")
    assert m.models == ["tiny-sd", "tiny-llama"] and m.tls_cert_file == ""


@pytest.mark.parametrize(("text", "needle"), [
    ("verify_rat = 0.1\n", "unknown keys verify_rat"),
    ('verify_rate = "often"\n', "config key 'verify_rate': expected float"),
    ("verify_rate = 1.5\n", "config key 'verify_rate' must be between 0 and 1 (got 1.5)"),
    ("verify_tolerance = -0.1\n", "'verify_tolerance' must be between 0 and 1"),
    ("stall_timeout_s = 0\n", "'stall_timeout_s' must be at least 0.001"),
    ("quarantine_after = 0\n", "'quarantine_after' must be at least 1"),
    ("probation_checks = -1\n", "'probation_checks' must be at least 0"),
    ("max_attempts = 0\n", "'max_attempts' must be at least 1"),
    ("verify_rate = \n", "is not valid TOML"),
    ('[[clients]]\nid = "ops"\napi_key_sha256 = "ab"\noperator = "yes"\n', "operator must be true or false"),
    ('[[models]]\nname = "tiny-sd"\nkind = "video"\n', 'models.tiny-sd: kind must be "image" or "text"'),
    ('[[models]]\nname = "tiny-sd"\nmax_price_per_unit = -1\n', "max_price_per_unit must be an integer between 0 and 1e+10"),
    ('[[models]]\nname = "tiny-sd"\nprice = 3\n', "config key 'models': unknown keys price in an entry"),
    ('allow_new_models = "maybe"\n', "config key 'allow_new_models': expected bool"),
    ("default_max_price_per_unit = -5\n", "'default_max_price_per_unit' must be between 0 and 1e+10"),
    ('[[clients]]\nid = "ops"\napi_key_sha256 = "ab"\nburst = 0\n', "'clients.ops.burst' must be at least 1"),
    ("max_upload_bytes_per_miner = 1000\n", "'max_upload_bytes_per_miner' (1000) is below max_artifact_bytes"),
    ("max_artifact_bytes = 1073741824\n", "'max_upload_bytes_per_miner' (134217728) is below max_artifact_bytes"),
    ("max_upload_bytes_in_flight = 0\n", "'max_upload_bytes_in_flight' must be at least 1"),
    ("artifact_retention_s = -1\n", "'artifact_retention_s' must be at least 0"),
    ('database_url = "mysql://u:pw@db/aitbc"\n', "'database_url' must be a postgresql:// URL"),
    ('database_url = "127.0.0.1:5432"\n', "'database_url' must be a postgresql:// URL"),
])
def test_bad_values_are_refused_with_the_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(InvalidArgument) as err:
        config.load(CoordinatorConfig, f, "COORDINATOR")
    assert needle in err.value.message


@pytest.mark.parametrize(("cls", "values", "needle"), [
    (MinerConfig, {"price_per_unit": -1}, "'price_per_unit' must be at least 0"),
    (MinerConfig, {"max_concurrency": 0}, "'max_concurrency' must be at least 1"),
    (WalletConfig, {"idle_lock_s": 0}, "'idle_lock_s' must be at least 0.001"),
    (WalletConfig, {"unlock_backoff_base_s": 0}, "'unlock_backoff_base_s' must be at least 0.001"),
    (WalletConfig, {"unlock_backoff_max_s": 0.5}, "'unlock_backoff_max_s' must be between 1 and 86400"),
])
def test_miner_and_wallet_values_are_checked_too(cls: type, values: dict, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        config.load(cls, None, "X", **values)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        config.load(CoordinatorConfig, tmp_path / "nope.toml", "COORDINATOR")
