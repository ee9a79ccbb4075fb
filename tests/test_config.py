import pytest

from dache.config import SETTINGS, ConfigError, Options, resolve


def test_defaults():
    config = resolve({}, {})
    assert config.port == 8080
    assert config.listen is None
    assert config.max_key_bytes == 1024
    assert config.max_value_bytes == 1024 * 1024
    assert config.write_timeout == 2.0
    assert config.access_log is False


def test_environment_is_read_and_the_option_wins():
    assert resolve({}, {"PORT": "9000"}).port == 9000
    assert resolve({"port": "9001"}, {"PORT": "9000"}).port == 9001
    assert resolve({}, {"DURABILITY_ENGINE": "MEMORY"}).durability_engine == "memory"
    assert resolve({}, {"ACCESS_LOG": "true"}).access_log is True


@pytest.mark.parametrize(
    "options, environ, message",
    [
        ({}, {"PORT": "http"}, "PORT must be an integer from 0 to 65535 (got 'http')"),
        ({"port": "70000"}, {}, "--port must be an integer from 0 to 65535"),
        ({}, {"DURABILITY_ENGINE": "redis"}, "DURABILITY_ENGINE must be one of: memory"),
        ({}, {"WRITE_TIMEOUT": "0"}, "WRITE_TIMEOUT must be a positive number of seconds"),
        ({}, {"MAX_KEY_BYTES": "-1"}, "MAX_KEY_BYTES must be a positive integer"),
        ({}, {"ACCESS_LOG": "maybe"}, "ACCESS_LOG must be true or false"),
    ],
)
def test_bad_settings_name_the_setting_and_what_it_accepts(options, environ, message):
    with pytest.raises(ConfigError) as raised:
        resolve(options, environ)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_every_setting_has_an_option_that_names_its_environment_variable():
    help_text = str(Options())
    for setting in SETTINGS:
        assert f"--{setting.option}" in help_text
        assert f"[{setting.env}]" in help_text


def test_secrets_are_never_echoed():
    from dache import config as config_module

    secret = config_module.Setting(
        "TEST_SECRET", "test-secret", None, config_module.positive_int, "a secret", secret=True
    )
    config_module.SETTINGS.append(secret)
    try:
        with pytest.raises(ConfigError) as raised:
            resolve({}, {"TEST_SECRET": "hunter2"})
        assert "hunter2" not in str(raised.value)
        assert "hunter2" not in repr(
            resolve({}, {"TEST_SECRET": "7"}).replace(test_secret="hunter2")
        )
    finally:
        config_module.SETTINGS.remove(secret)


def test_postgres_takes_a_primary_and_its_standbys_as_host_and_port_lists():
    from dache.engines.pg_pool import one_per_host
    from dache.engines.postgres import settings_from_config

    base = {"DURABILITY_ENGINE": "postgres", "POSTGRES_DATABASE": "d", "POSTGRES_USER": "u"}
    config = resolve({}, {**base, "POSTGRES_HOST": "db1, db2", "POSTGRES_PORT": "5432,6432"})
    settings = settings_from_config(config)
    assert settings.where == "u@db1:5432,db2:6432/d"
    info = settings.conninfo()
    assert (info["host"], info["port"], info["target_session_attrs"]) == (
        "db1,db2",
        "5432,6432",
        "read-write",
    )
    assert [(c["host"], c["port"]) for c in one_per_host(info)] == [
        ("db1", "5432"),
        ("db2", "6432"),
    ]
    one_port = settings_from_config(resolve({}, {**base, "POSTGRES_HOST": "db1,db2"}))
    assert one_port.where == "u@db1:5432,db2:5432/d"
    assert (
        "target_session_attrs"
        not in settings_from_config(resolve({}, {**base, "POSTGRES_HOST": "db1"})).conninfo()
    )
    with pytest.raises(ConfigError, match="POSTGRES_PORT has 3 ports for 2 POSTGRES_HOST hosts"):
        settings_from_config(
            resolve({}, {**base, "POSTGRES_HOST": "db1,db2", "POSTGRES_PORT": "1,2,3"})
        )
    with pytest.raises(ConfigError, match="POSTGRES_PORT"):
        resolve({}, {**base, "POSTGRES_PORT": "5432,x"})
    with pytest.raises(ConfigError, match="POSTGRES_HOST"):
        resolve({}, {**base, "POSTGRES_HOST": "db1,,db2"})
