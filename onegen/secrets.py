"""Recognise secrets, so that none is ever taken from a config file, logged to MLflow or printed.

Two lines of defence:
  * configs refuse credential-looking keys and values (`secret_problems`, called by onegen.config): a runtime env
    shows in Ray's dashboard, a config file lands in git and in MLflow, so redaction alone is not enough;
  * whatever still reaches a log (MLflow params, tags, artifacts, log records) goes through `redact` first.

A *name* looks secret when one of its words is SECRET, TOKEN, PASSWORD, PASSWD, PWD, PASSPHRASE, APIKEY or
CREDENTIAL(S) or ends with one (HFTOKEN, DBPASSWORD), when its last word is KEY, PASS or PW (API_KEY, DB_PASS) or when
it is an AWS credential variable. Words, not substrings: TOKENIZERS_PARALLELISM and max_tokens are not secrets. A
*value* looks secret when it carries a password (scheme://user:password@host, or user:password@host without a
scheme; the password may hold ':' and '@'), a credential in a query string (?password=, &token=, X-Amz-Signature=)
or has the shape of a well-known token (AWS access key ids, Hugging Face, GitHub, OpenAI-style keys, bearer tokens,
PEM private keys).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

# A word that is, or ends with, one of these is secret (TOKEN, HFTOKEN, DBPASSWORD); "tokens", "tokenizers" are not.
_SECRET_SUFFIXES = ("token", "password", "passwd", "secret", "apikey", "accesskey")
_SECRET_WORDS = {"pwd", "passphrase", "credential", "credentials"}  # secret only as a whole word
_SECRET_LAST_WORDS = {"key", "pass", "pw"}  # only at the end: DB_PASS, API_KEY; not pass_rate, key_frames
_AWS_CREDENTIAL_NAMES = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_security_token"}

# The password runs to the last '@' before the host, so one holding '@' or ':' is hidden whole.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)(?P<password>[^/\s]+)(?P<at>@)")
# The same userinfo without a scheme: user:password@host as in a mistyped ray.address, or a URL whose "//" a path
# join collapsed (http:/user:password@host).
_BARE_PASSWORD = re.compile(r"(?P<head>(?<![\w.+\-%:@])[\w.+\-%]+:)(?P<password>[^\s/]+)(?P<at>@)(?=[\w\[])")
# Credentials in a query string (?password=..., &token=..., presigned URLs' X-Amz-Signature / Credential).
_QUERY_SECRET = re.compile(r"(?P<head>[?&;](?:[\w.\-]*?)(?:password|passwd|pwd|token|secret|api[_-]?key|"
                           r"access[_-]?key|signature|credential|sig)=)(?P<password>[^&\s#]+)", re.IGNORECASE)
_TOKEN_SHAPES = re.compile(
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"                    # AWS access key ids
    r"|\bhf_[A-Za-z0-9]{30,}\b"                         # Hugging Face tokens
    r"|\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})\b"  # GitHub tokens
    r"|\bsk-[A-Za-z0-9_\-]{20,}"                        # OpenAI-style API keys
    r"|\bBearer\s+[A-Za-z0-9\-._~+/]{8,}=*"              # HTTP bearer tokens
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)")

CREDENTIAL_HINT = ("secrets never go in config files (git, MLflow and Ray's dashboard would show them): use the "
                   "standard credential chain (AWS: AWS_PROFILE with ~/.aws, AWS_* variables in the nodes' "
                   "environment or an instance role; HF_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD or "
                   "MLFLOW_TRACKING_TOKEN in the nodes' environment)")


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # secretKey -> secret_Key
    return [word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word]


def is_secret_name(name: str) -> bool:
    """True for names like AWS_SECRET_ACCESS_KEY, HF_TOKEN, db_password, WANDB_API_KEY, secretKey."""
    words = _words(str(name))
    if not words:
        return False
    return ("_".join(words) in _AWS_CREDENTIAL_NAMES or words[-1] in _SECRET_LAST_WORDS
            or any(word in _SECRET_WORDS or word.endswith(_SECRET_SUFFIXES) for word in words))


def looks_like_secret_value(value: str) -> bool:
    """True when `value` holds a password in a URL or a well-known token shape."""
    return bool(_URL_PASSWORD.search(value) or _BARE_PASSWORD.search(value) or _QUERY_SECRET.search(value)
                or _TOKEN_SHAPES.search(value))


def redact(text: str) -> str:
    """`text` with URL passwords and token-shaped strings replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['at']}", text)
    text = _BARE_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['at']}", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact_value(name: str, value: Any) -> Any:
    """The value to log under `name`: *** for secret names, redacted text for strings, containers walked."""
    if is_secret_name(name) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: redact_value(str(key), item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(name, item) for item in value]
    return value


def secret_problems(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, reason) for every credential-looking key or value in a parsed config. Values are never quoted."""
    found: list[tuple[str, str]] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if is_secret_name(str(key)) and value not in (None, "", {}, []):
                found.append((dotted, "looks like a credential"))
            else:
                found.extend(secret_problems(value, dotted))
    elif isinstance(data, (list, tuple)):
        for index, item in enumerate(data):
            found.extend(secret_problems(item, f"{prefix}[{index}]"))
    elif isinstance(data, str) and looks_like_secret_value(data):
        reason = ("holds a password in a URL" if _URL_PASSWORD.search(data)
                  else "holds a password (user:password@host)" if _BARE_PASSWORD.search(data)
                  else "holds a credential in a query string" if _QUERY_SECRET.search(data)
                  else "holds a token-like secret")
        found.append((prefix, reason))
    return found


def _redact_record(record: logging.LogRecord) -> None:
    """Redact a record's message (rendered with its args) before any handler formats it."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: let logging report it as usual
        return
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process, whichever logger made it (MLflow, Ray, boto3, onegen).

    A record factory runs once per record at creation, so it covers handlers added later too (a filter on the root
    logger would miss records that propagate from child loggers)."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
