"""Settings: defaults < NODECACHE_* environment < flags, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nodecache.config import Config, ConfigError, MiB, load


def test_defaults_are_valid():
    cfg = load(environ={})
    assert cfg == Config()
    assert cfg.mount is None
    assert cfg.cache_dir == Path("/var/lib/nodecache")
    assert cfg.repos == ()
    assert cfg.hub_url == "https://huggingface.co"
    assert cfg.hub_token is None
    assert cfg.chunk_size == 8 * MiB
    assert cfg.fill_on_open is True and cfg.fsync is True
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 8470)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chunk_size = MiB  # type: ignore[misc]


def test_unrelated_environment_is_ignored():
    env = {"NODECACHE": "x", "CHUNK_SIZE": "3", "NODECACHE_NO_SUCH_KEY": "1", "HOME": "/root"}
    assert load(environ=env) == Config()


def test_env_parsing_of_every_kind():
    env = {
        "NODECACHE_MOUNT": "/mnt/models",
        "NODECACHE_CACHE_DIR": "/data/nc",
        "NODECACHE_REPOS": "org/a, datasets/org/b@v1  org/c@refs/pr/2,,",
        "NODECACHE_HUB_URL": "http://hub.local:8080",
        "NODECACHE_HUB_TOKEN": "hf_env",
        "NODECACHE_LISTEN": "0.0.0.0:9000",
        "NODECACHE_CHUNK_SIZE": str(4 * MiB),
        "NODECACHE_READ_AHEAD_CHUNKS": "0",
        "NODECACHE_FILL_ON_OPEN": "false",
        "NODECACHE_PARALLEL_PER_BLOB": "3",
        "NODECACHE_PARALLEL_TOTAL": "12",
        "NODECACHE_READ_TIMEOUT": "2.5",
        "NODECACHE_RETRY_BASE": "0.05",
        "NODECACHE_FSYNC": "off",
        "NODECACHE_BDI_READ_AHEAD_KB": "0",
        "NODECACHE_REF_TTL": "60",
    }
    cfg = load(environ=env)
    assert cfg.mount == Path("/mnt/models") and isinstance(cfg.mount, Path)
    assert cfg.cache_dir == Path("/data/nc") and isinstance(cfg.cache_dir, Path)
    assert cfg.repos == ("org/a", "datasets/org/b@v1", "org/c@refs/pr/2")
    assert cfg.hub_url == "http://hub.local:8080"
    assert cfg.hub_token == "hf_env"
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 9000)
    assert cfg.chunk_size == 4 * MiB and type(cfg.chunk_size) is int
    assert cfg.read_ahead_chunks == 0
    assert cfg.fill_on_open is False
    assert (cfg.parallel_per_blob, cfg.parallel_total) == (3, 12)
    assert cfg.read_timeout == 2.5 and type(cfg.read_timeout) is float
    assert cfg.retry_base == 0.05
    assert cfg.fsync is False
    assert cfg.bdi_read_ahead_kb == 0
    assert cfg.ref_ttl == 60.0 and type(cfg.ref_ttl) is float


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True)]
    + [("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False)],
)
def test_env_booleans(raw, value):
    cfg = load(environ={"NODECACHE_FSYNC": raw, "NODECACHE_FILL_ON_OPEN": raw})
    assert cfg.fsync is value
    assert cfg.fill_on_open is value


def test_empty_mount_env_means_no_mount():
    assert load(environ={"NODECACHE_MOUNT": ""}).mount is None


def test_empty_repos_env_means_no_repos():
    assert load(environ={"NODECACHE_REPOS": " , "}).repos == ()


def test_load_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("NODECACHE_CHUNK_SIZE", str(2 * MiB))
    monkeypatch.setenv("NODECACHE_REPOS", "org/x")
    cfg = load()
    assert cfg.chunk_size == 2 * MiB
    assert cfg.repos == ("org/x",)


def test_flags_override_env():
    env = {
        "NODECACHE_CHUNK_SIZE": str(4 * MiB),
        "NODECACHE_REPOS": "org/env",
        "NODECACHE_LISTEN": "127.0.0.1:1",
        "NODECACHE_FILL_ON_OPEN": "true",
        "NODECACHE_CACHE_DIR": "/env/dir",
        "NODECACHE_MOUNT": "/env/mnt",
    }
    flags = {
        "chunk_size": 16 * MiB,
        "repos": ["org/flag", "datasets/org/d"],
        "listen": "[::1]:8000",
        "fill_on_open": False,
        "cache_dir": "/flag/dir",
        "mount": "/flag/mnt",
    }
    cfg = load(flags, environ=env)
    assert cfg.chunk_size == 16 * MiB
    assert cfg.repos == ("org/flag", "datasets/org/d")  # a tuple, replacing (not adding to) the env's
    assert (cfg.listen_host, cfg.listen_port) == ("::1", 8000)  # the address to bind, without brackets
    assert cfg.fill_on_open is False
    assert cfg.cache_dir == Path("/flag/dir")
    assert cfg.mount == Path("/flag/mnt")


def test_none_flags_are_ignored():
    env = {"NODECACHE_CHUNK_SIZE": str(4 * MiB), "NODECACHE_HUB_URL": "http://env"}
    cfg = load({"chunk_size": None, "hub_url": None, "mount": None, "repos": None}, environ=env)
    assert cfg.chunk_size == 4 * MiB
    assert cfg.hub_url == "http://env"
    assert cfg.mount is None
    assert cfg.repos == ()


def test_hf_endpoint_and_token_fallbacks():
    hf = {"HF_ENDPOINT": "http://mirror.local", "HF_TOKEN": "hf_from_hf"}
    cfg = load(environ=hf)
    assert cfg.hub_url == "http://mirror.local"
    assert cfg.hub_token == "hf_from_hf"

    ours = {**hf, "NODECACHE_HUB_URL": "http://ours", "NODECACHE_HUB_TOKEN": "hf_ours"}
    cfg = load(environ=ours)
    assert cfg.hub_url == "http://ours"
    assert cfg.hub_token == "hf_ours"

    cfg = load({"hub_url": "http://flag", "hub_token": "hf_flag"}, environ=ours)
    assert cfg.hub_url == "http://flag"
    assert cfg.hub_token == "hf_flag"

    cfg = load({"hub_url": "http://flag"}, environ=hf)
    assert cfg.hub_url == "http://flag"
    assert cfg.hub_token == "hf_from_hf"


def test_empty_hf_fallbacks_are_ignored():
    cfg = load(environ={"HF_ENDPOINT": "", "HF_TOKEN": ""})
    assert cfg.hub_url == "https://huggingface.co"
    assert cfg.hub_token is None


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"NODECACHE_CHUNK_SIZE": str(3 * MiB)}, "chunk_size"),
        ({"NODECACHE_CHUNK_SIZE": str(8 * MiB + 1)}, "chunk_size"),
        ({"NODECACHE_CHUNK_SIZE": "32768"}, "chunk_size"),  # a power of two, but below 64 KiB
        ({"NODECACHE_CHUNK_SIZE": "0"}, "chunk_size"),
        ({"NODECACHE_CHUNK_SIZE": "-65536"}, "chunk_size"),
        ({"NODECACHE_CHUNK_SIZE": "8MiB"}, "chunk_size"),
        ({"NODECACHE_PARALLEL_TOTAL": "many"}, "parallel_total"),
        ({"NODECACHE_PARALLEL_TOTAL": "1.5"}, "parallel_total"),
        ({"NODECACHE_PARALLEL_TOTAL": "0"}, "parallel_total"),
        ({"NODECACHE_PARALLEL_PER_BLOB": "0"}, "parallel_per_blob"),
        ({"NODECACHE_READ_AHEAD_CHUNKS": "-1"}, "read_ahead_chunks"),
        ({"NODECACHE_HASH_NICE": "-21"}, "hash_nice"),
        ({"NODECACHE_HASH_NICE": "20"}, "hash_nice"),
        ({"NODECACHE_HASH_NICE": "high"}, "hash_nice"),
        ({"NODECACHE_BDI_READ_AHEAD_KB": ""}, "bdi_read_ahead_kb"),
        ({"NODECACHE_READ_TIMEOUT": "soon"}, "read_timeout"),
        ({"NODECACHE_READ_TIMEOUT": "0"}, "read_timeout"),
        ({"NODECACHE_READ_TIMEOUT": "-1"}, "read_timeout"),
        ({"NODECACHE_REF_TTL": "10m"}, "ref_ttl"),
        ({"NODECACHE_FSYNC": "maybe"}, "fsync"),
        ({"NODECACHE_FILL_ON_OPEN": ""}, "fill_on_open"),
        ({"NODECACHE_LISTEN": "localhost"}, "listen"),
        ({"NODECACHE_LISTEN": "localhost:"}, "listen"),
        ({"NODECACHE_LISTEN": ":8470"}, "listen"),
        ({"NODECACHE_LISTEN": "localhost:http"}, "listen"),
        ({"NODECACHE_LISTEN": "localhost:-1"}, "listen"),
        ({"NODECACHE_REPOS": "org/ok a/b/c"}, "repos"),
        ({"NODECACHE_REPOS": "org/name@.."}, "repos"),
        ({"NODECACHE_REPOS": "../etc"}, "repos"),
    ],
)
def test_invalid_env_values_name_the_key(env, key):
    with pytest.raises(ConfigError) as e:
        load(environ=env)
    assert str(e.value).startswith(key + ":"), str(e.value)


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        ({"chunk_size": 3 * MiB}, "chunk_size"),
        ({"listen": "nohost"}, "listen"),
        ({"repos": ["datasets/a/b/c"]}, "repos"),
        ({"parallel_per_blob": 0}, "parallel_per_blob"),
    ],
)
def test_invalid_flags_name_the_key(flags, key):
    with pytest.raises(ConfigError) as e:
        load(flags, environ={})
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_invalid_values_rejected_when_constructed_directly():
    with pytest.raises(ConfigError, match="^chunk_size:"):
        Config(chunk_size=100_000)
    with pytest.raises(ConfigError, match="^repos:"):
        Config(repos=("a--b/c",))
    assert Config(chunk_size=64 * 1024).chunk_size == 64 * 1024
    assert Config(chunk_size=1 << 30).chunk_size == 1 << 30


def test_hub_token_not_in_repr():
    secret = "hf_SuperSecretToken123"
    for cfg in (Config(hub_token=secret), load(environ={"HF_TOKEN": secret}), load({"hub_token": secret}, environ={})):
        assert cfg.hub_token == secret
        assert secret not in repr(cfg)
        assert secret not in str(cfg)
        assert "hub_token" not in repr(cfg)
        assert "chunk_size=" in repr(cfg)  # the rest is still shown


def test_empty_cache_dir_env_is_a_config_error():
    with pytest.raises(ConfigError, match="^cache_dir:"):
        load(environ={"NODECACHE_CACHE_DIR": ""})


def test_listen_port_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="^listen:"):
        load(environ={"NODECACHE_LISTEN": "127.0.0.1:65536"})
