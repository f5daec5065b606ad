"""The config is validated once, and every problem is one line naming the key and the value."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_pipeline_yaml_spells_out_the_defaults():
    assert load_config(REPO / "pipeline.yaml") == Config()


@pytest.mark.parametrize(
    "text, message",
    [
        ("workers:\n  locl: 2\n", "unknown key 'workers.locl'"),
        ("workers:\n  local: many\n", "workers.local"),
        ("workers:\n  device: gpu7\n", "workers.device"),
        ("volume:\n  source: both\n", "volume.source"),
        ("models:\n  tlm:\n    weights: nowhere.safetensors\n", "models.tlm.weights: file not found"),
        ("watch: [1, 2\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_configs_give_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  sslm:\n    weights: w.pt\nwatch:\n  dirs: [data]\n")
    config = load_config(path)
    assert config.models.sslm.weights == tmp_path / "w.pt"
    assert config.watch.dirs == [tmp_path / "data"]


def test_log_levels_are_taken_in_any_case(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("daemon:\n  log_level: debug\n")
    assert load_config(path).daemon.log_level == "DEBUG"
    result = subprocess.run([sys.executable, "-m", "pipeline", "status", "--log-level", "warning", "--endpoint", "tcp://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("no daemon answers at tcp://127.0.0.1:1"), result.stderr


def test_the_command_line_reports_a_bad_config_in_one_line_with_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("workers:\n  local: -1\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(path), "--watch", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "workers.local" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("workers:\n  locl: 2\n", "unknown key 'workers.locl' (did you mean 'workers.local'?)"),
        ("wokers:\n  local: 2\n", "unknown key 'wokers' (did you mean 'workers'?)"),
        ("models:\n  tlm:\n    score_treshold: 0.5\n", "unknown key 'models.tlm.score_treshold' (did you mean 'models.tlm.score_threshold'?)"),
        ("daemon:\n  controll: tcp://127.0.0.1:5\n", "unknown key 'daemon.controll' (did you mean 'daemon.control'?)"),
        ("volume:\n  zzz: 1\n", "unknown key 'volume.zzz' (volume has: source, min_pixels)"),
    ],
)
def test_an_unknown_key_says_the_closest_known_one_and_the_file(tmp_path, text, message):
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: {message}"


def test_the_web_view_looks_for_stores_where_follow_requests_may_put_them_too(tmp_path):
    from pipeline.web.server import options_from

    visit = tmp_path / "visit"
    inside, outside = visit / "processing", tmp_path / "processing-elsewhere"
    config = Config.model_validate({"watch": {"dirs": [str(visit)]}, "output": {"requested_roots": [str(inside), str(outside)]}})
    assert options_from(config).roots == [visit, outside]  # one inside the visit is listed once, through the visit
    config = Config.model_validate({**config.model_dump(mode="json"), "web": {"roots": [str(visit)]}})
    assert options_from(config).roots == [visit]  # web.roots, when set, is the whole answer
