"""Settings precedence: flags > environment > file > defaults; validation names the source."""
import json

import pytest

from ingest import config


def test_defaults_match_the_contract():
    s = config.resolve({}, environ={})
    assert (s.host, s.port, s.kestrel) == ("127.0.0.1", 8000, ("127.0.0.1:22133",))
    assert s.spool is None and s.routes is None
    assert s.max_records == 2000 and s.max_properties == 255


def test_flag_beats_env_beats_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"max_records": 10, "drain_s": 3, "kestrel": "f:1"}))
    env = {"INGEST_MAX_RECORDS": "20", "INGEST_CONFIG": str(path)}
    s = config.resolve({"max_records": "30"}, environ=env)
    assert s.max_records == 30            # flag
    s = config.resolve({}, environ=env)
    assert s.max_records == 20            # env
    assert s.drain_s == 3.0               # file
    assert s.kestrel == ("f:1",)


def test_ingest_port_belongs_to_nginx_not_the_worker():
    s = config.resolve({}, environ={"INGEST_PORT": "8080"})
    assert s.port == 8000
    assert config.resolve({}, environ={"INGEST_WORKER_PORT": "9001"}).port == 9001


def test_kestrel_list_and_trusted_proxies_parse():
    s = config.resolve({"kestrel": "a:1, b:2", "trusted_proxies": "10.0.0.0/8,::1"}, environ={})
    assert s.kestrel == ("a:1", "b:2")
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize("flags, source", [
    ({"max_records": "many"}, "--max-records"),
    ({"kestrel": "nohostport"}, "--kestrel"),
    ({"trusted_proxies": "not-a-network"}, "--trusted-proxies"),
    ({"reuse_port": "perhaps"}, "--reuse-port"),
])
def test_bad_values_name_their_source(flags, source):
    with pytest.raises(ValueError, match=source):
        config.resolve(flags, environ={})


def test_non_positive_limits_refused():
    with pytest.raises(ValueError, match="max_in_flight"):
        config.resolve({"max_in_flight": "0"}, environ={})


def test_unknown_file_keys_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"max_recrods": 5}')
    with pytest.raises(ValueError, match="max_recrods"):
        config.resolve({"config": str(path)}, environ={})


def test_settings_are_frozen_and_described():
    s = config.resolve({}, environ={})
    with pytest.raises(Exception):
        s.port = 1
    assert "kestrel=127.0.0.1:22133" in s.describe()
