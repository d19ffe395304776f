"""Secret recognition and redaction (onegen/secrets.py): what configs refuse and what logs never show."""

from __future__ import annotations

import logging

import pytest

from onegen.secrets import (REDACTED, install_log_redaction, is_secret_name, looks_like_secret_value, redact,
                            redact_value, secret_problems)


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                                  "GITHUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "db_password",
                                  "secretKey", "client_secret", "GOOGLE_APPLICATION_CREDENTIALS", "private_key"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "MAX_TOKENS", "tokenizer", "OMP_NUM_THREADS",
                                  "RAY_AUTH_MODE", "keys", "monkey", "AWS_ENDPOINT_URL", "AWS_PROFILE"])
def test_harmless_names(name):
    assert not is_secret_name(name)


def test_secret_values_are_recognised_and_redacted():
    aws_id, hf = "AKIAIOSFODNN7EXAMPLE", "hf_" + "x" * 34
    for value in (aws_id, hf, "postgresql://u:pw@db/x", "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA "
                  "PRIVATE KEY-----"):
        assert looks_like_secret_value(value)
        assert redact(value) != value
    assert not looks_like_secret_value("s3://bucket/prefix") and not looks_like_secret_value("http://host:5000")
    assert redact(f"key {aws_id} at https://user:pw@host:9000/x") == f"key {REDACTED} at https://user:***@host:9000/x"
    assert redact_value("HF_TOKEN", "abc") == REDACTED
    assert redact_value("env", {"HF_TOKEN": "abc", "URL": "http://a:b@c/"}) == {"HF_TOKEN": REDACTED,
                                                                               "URL": "http://a:***@c/"}


def test_secret_problems_name_keys_and_never_values():
    found = secret_problems({"ray": {"env": {"HF_TOKEN": "abc", "OK": "1"}}, "uris": ["http://u:pw@h/"]})
    assert found == [("ray.env.HF_TOKEN", "looks like a credential"), ("uris[0]", "holds a password in a URL")]
    assert secret_problems({"HF_TOKEN": None, "password": ""}) == []  # empty placeholders carry no secret


def test_log_records_are_redacted_for_every_logger(caplog):
    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("botocore.somewhere").info("using %s", "AKIAIOSFODNN7EXAMPLE")
        logging.getLogger().info("uri https://u:secretpw@host/")
    assert "AKIAIOSFODNN7EXAMPLE" not in caplog.text and "secretpw" not in caplog.text
    assert caplog.text.count(REDACTED) == 2
