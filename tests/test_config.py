"""config.toml: typed, frozen, and every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest

from specd.shared.config import Config, load_config, read_secret, to_dict
from specd.shared.config_origins import ConfigLayer
from specd.shared.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def test_repository_config_is_the_documented_defaults():
    assert load_config(REPO_CONFIG) == Config()
    assert load_config(None) == Config()


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("[speculation]\ngama = 3\n", "unknown key 'gama' in [speculation]; allowed: gamma, gamma_max"),
    ("[nonsense]\nx = 1\n", "unknown key 'nonsense' in top level"),
    ("[server]\nport = \"80\"\n", "[server] port: expected `int`, got `str`"),
    ("[server]\nport = 70000\n", "[server] port: expected `int` <= 65535"),
    ("[speculation]\ngamma = \"fast\"\n",
     "[speculation] gamma: 'fast' is not allowed; use an integer >= 1 or \"auto\""),
    ("[devices]\nedge_device = \"tpu\"\n", "[devices] edge_device: 'tpu' is not allowed"),
    ("[devices.gpu]\ndevice_id = -1\n", "[devices.gpu] device_id: expected `int` >= 0"),
    ("[sampling]\ntop_p = 0.0\n", "[sampling] top_p: expected `float` > 0.0"),
    ("[speculation]\ngamma = 17\n", "gamma = 17 (in {path}) exceeds [speculation] gamma_max = 16 (the default)"),
    ("[server]\ntls_cert = \"a.pem\"\n", "tls_cert and tls_key must be given together"),
    ("[server]\ndevice = \"gpu\"\n", "allowed auto, cpu, cuda or cuda:N"),
    ("[client]\nserver_url = \"http://x\"\n", "must start with ws:// or wss://"),
    ("[server\n", "not valid TOML"),
])
def test_mistakes_fail_with_a_message_naming_the_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message.format(path=path) in str(err.value) and str(path) in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_flags_override_the_file_and_unset_flags_do_not(tmp_path):
    path = _write(tmp_path, "[server]\nport = 9000\nhost = \"0.0.0.0\"\n")
    cfg = load_config(path, overrides={"server": {"port": 9100, "host": None}})
    assert (cfg.server.port, cfg.server.host) == (9100, "0.0.0.0")


def test_layers_apply_between_file_and_flags(tmp_path):
    path = _write(tmp_path, "[sampling]\ntemperature = 0.3\nseed = 5\n")
    cfg = load_config(path, layers=[{"sampling": {"temperature": 0.0}}], overrides={"sampling": {"seed": 9}})
    assert (cfg.sampling.temperature, cfg.sampling.seed) == (0.0, 9)
    assert to_dict(cfg)["sampling"]["temperature"] == 0.0


def test_secrets_come_from_environment_or_file_never_from_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "  s3cret \n")
    assert read_secret("MY_KEY", "") == "s3cret"
    monkeypatch.delenv("MY_KEY")
    key_file = tmp_path / "key"
    key_file.write_text("fromfile\nignored\n")
    assert read_secret("MY_KEY", str(key_file)) == "fromfile"
    assert read_secret("MY_KEY", "") is None
    with pytest.raises(ConfigError, match="cannot read the key file"):
        read_secret("", str(tmp_path / "missing"))
    path = _write(tmp_path, "[server]\napi_key = \"x\"\n")
    with pytest.raises(ConfigError, match="unknown key 'api_key'"):
        load_config(path)


# -- each value knows where it came from --------------------------------------------------------
FLAGS = {"speculation.gamma": "--gamma", "server.port": "--port", "limits.max_total_tokens": "--max-total-tokens",
         "limits.max_input_tokens": "--max-input-tokens", "server.device": "--device"}


def flags(values: dict) -> ConfigLayer:
    return ConfigLayer(values, "the command line", FLAGS)


@pytest.mark.parametrize(("file_text", "layer", "override", "message"), [
    ("", None, flags({"speculation": {"gamma": 17}}), "--gamma 17 exceeds [speculation] gamma_max = 16 (the default)"),
    ("[speculation]\ngamma_max = 4\n", None, flags({"speculation": {"gamma": 6}}),
     "--gamma 6 exceeds [speculation] gamma_max = 4 (in {path})"),
    ("", ConfigLayer({"speculation": {"gamma": 17}}, "Settings"), None,
     "[speculation] gamma = 17 (in Settings) exceeds [speculation] gamma_max = 16 (the default)"),
    ("[speculation]\ngamma = 3\n", ConfigLayer({"speculation": {"gamma_max": 20}}, "Settings"), None,
     "[speculation] gamma_max = 20 (in Settings) exceeds [limits] max_draft = 16 (the default)"),
    ("[server]\nport = 80\n", None, flags({"server": {"port": 70000}}), "--port 70000: expected `int` <= 65535"),
    ("", ConfigLayer({"sampling": {"top_p": 2.0}}, "Settings"), None,
     "Settings: [sampling] top_p: expected `float` <= 1.0"),
    ("", None, flags({"server": {"device": "tpu"}}), "--device tpu: allowed auto, cpu, cuda or cuda:N"),
])
def test_errors_name_the_flag_file_or_layer_that_set_each_value(tmp_path, file_text, layer, override, message):
    path = _write(tmp_path, file_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, override, layers=[layer] if layer else None)
    assert message.format(path=path) in str(err.value)
    if "(in {path})" not in message:
        assert str(path) not in str(err.value)  # the file did not set the values in question


def test_a_prompt_limit_above_the_total_is_left_to_the_verifier_to_cap(tmp_path):
    # The verifier caps it with a warning naming both sources (tests/test_first_run_messages.py), as it
    # caps a total above the model's context: the config refuses neither.
    cfg = load_config(_write(tmp_path, "[limits]\nmax_input_tokens = 4096\n"),
                      flags({"limits": {"max_total_tokens": 256}}))
    assert (cfg.limits.max_input_tokens, cfg.limits.max_total_tokens) == (4096, 256)


def test_changed_only_keeps_what_differs_from_the_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "[limits]\nmax_total_tokens = 256\n[server]\nport = 8765\n"))
    assert to_dict(cfg, changed_only=True) == {"limits": {"max_total_tokens": 256}}
