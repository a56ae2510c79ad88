"""S3 requests signed with AWS Signature Version 4: presigned GET URLs and signed headers.

A grid page needs two URLs per tile. Presigning one took botocore 1.40 and aiobotocore
2.25 about 0.3 ms each in bench/page.py on the 2-core machine in docs/benchmarks.md. This
signer builds the same canonical request with `hmac` and `hashlib`, caches what the URLs
of one window share, and took about 0.01 ms there. For the same inputs its URLs are
byte-identical to those of botocore's `generate_presigned_url("get_object", ...)`, which
tests/test_signing.py checks against botocore 1.40.

The steps follow S3SigV4QueryAuth in botocore/auth.py: the key percent-encoded except "/"
and "~", the query names and values except "-_.~", the canonical query sorted by encoded
name, only the Host header signed, and UNSIGNED-PAYLOAD as the payload hash.

HeaderSigner signs the worker's own object requests in an Authorization header instead,
as botocore's S3SigV4Auth does: every header sent is signed, and so is the SHA-256 of the
body. tests/test_signing.py checks its headers against S3SigV4Auth's too.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"

# S3 does not hash the body of a presigned request, because the signer does not have it.
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

# S3 rejects a presigned URL whose X-Amz-Expires is over 7 days.
MAX_EXPIRES_SECONDS = 7 * 24 * 3600

# Characters left unencoded: RFC 3986 unreserved characters in query names and values,
# plus "/" in the object key, which botocore also leaves as it is.
QUERY_SAFE = "-_.~"
KEY_SAFE = "/~"

ADDRESSING_STYLES = ("path", "virtual")

# A bucket that can be the first label of a host name. botocore falls back to path style
# for other buckets and for IP address endpoints, so virtual-host signing rejects them.
_HOST_LABEL_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")

_DEFAULT_PORTS = {"http": 80, "https": 443}


def window_start(now: float, window_seconds: int) -> int:
    """Round a Unix time down to the start of its window of `window_seconds`."""
    return int(now // window_seconds) * window_seconds


class _BucketSigner:
    """The endpoint, bucket and key pair that the requests for one bucket are signed with.

    With path-style addressing the bucket is the first path segment, and with virtual-host
    addressing it is the first label of the host name.
    """

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        region: str,
        access_key: str,
        secret_key: str,
        session_token: str | None = None,
        addressing_style: str = "path",
    ) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(
                f"S3 endpoint URL {endpoint_url!r} is invalid: expected http:// or https:// "
                "and a host name"
            )
        if addressing_style not in ADDRESSING_STYLES:
            raise ValueError(
                f"addressing style {addressing_style!r} is invalid: expected one of "
                f"{ADDRESSING_STYLES}"
            )
        base_path = parts.path.rstrip("/")
        host = _host_header(parts.scheme, parts.hostname, parts.port)
        if addressing_style == "virtual":
            _check_virtual_host_bucket(bucket, parts.hostname)
            self._origin = f"{parts.scheme}://{bucket}.{parts.netloc}"
            self._path_prefix = f"{base_path}/"
            host = f"{bucket}.{host}"
        else:
            self._origin = f"{parts.scheme}://{parts.netloc}"
            self._path_prefix = f"{base_path}/{_encode_query(bucket)}/"
        self._host = host
        self._region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._session_token = session_token
        self._day = ""
        self._day_key = b""

    def object_url(self, key: str) -> tuple[str, str]:
        """Return an object's URL and its path, percent-encoded as the signature needs it."""
        path = self._path_prefix + quote(key, safe=KEY_SAFE)
        return self._origin + path, path

    def _signing_key(self, day: str) -> bytes:
        """Return the key derived for one UTC day (YYYYMMDD), which every request that day uses."""
        if day != self._day:
            key = _hmac_sha256(f"AWS4{self._secret_key}".encode(), day)
            for part in (self._region, SERVICE, "aws4_request"):
                key = _hmac_sha256(key, part)
            self._day, self._day_key = day, key
        return self._day_key


class GetUrlSigner(_BucketSigner):
    """Signs GET URLs for the objects of one bucket at one endpoint with one key pair.

    `endpoint_url` is the S3 endpoint as the browser reaches it, because SigV4 signs the
    Host header.
    """

    _window: _SigningWindow | None = None

    def presign_get(
        self, key: str, *, signed_at: int, expires_in: int, query: Sequence[tuple[str, str]] = ()
    ) -> str:
        """Sign a GET URL for one object, valid from `signed_at` for `expires_in` seconds.

        `signed_at` is a Unix time in whole seconds. `query` contains extra parameters, such as
        response-content-type, in the order they appear in the URL. They are signed too, so
        S3 rejects the URL when one is changed.
        """
        window = self._window
        if window is None or (window.signed_at, window.expires_in) != (signed_at, expires_in):
            window = self._window = self._start_window(signed_at, expires_in)
        parameters = [(_encode_query(name), _encode_query(value)) for name, value in query]
        parameters.extend(window.auth_parameters)
        _, path = self.object_url(key)
        canonical_query = "&".join(f"{name}={value}" for name, value in sorted(parameters))
        canonical_request = (
            f"GET\n{path}\n{canonical_query}\nhost:{self._host}\n\nhost\n{UNSIGNED_PAYLOAD}"
        )
        signature = window.signature_hmac.copy()
        signature.update(hashlib.sha256(canonical_request.encode()).hexdigest().encode())

        url_query = "&".join(f"{name}={value}" for name, value in parameters)
        return f"{self._origin}{path}?{url_query}&X-Amz-Signature={signature.hexdigest()}"

    def _start_window(self, signed_at: int, expires_in: int) -> _SigningWindow:
        if not 1 <= expires_in <= MAX_EXPIRES_SECONDS:
            raise ValueError(
                f"expires_in={expires_in} is invalid: a presigned URL lives from 1 to "
                f"{MAX_EXPIRES_SECONDS} seconds"
            )
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed_at))
        day = amz_date[:8]
        scope = f"{day}/{self._region}/{SERVICE}/aws4_request"
        auth_parameters = [
            ("X-Amz-Algorithm", ALGORITHM),
            ("X-Amz-Credential", _encode_query(f"{self._access_key}/{scope}")),
            ("X-Amz-Date", amz_date),
            ("X-Amz-Expires", str(expires_in)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        if self._session_token is not None:
            auth_parameters.append(("X-Amz-Security-Token", _encode_query(self._session_token)))
        # The string to sign is this prefix and the canonical request's hash.
        signature_hmac = hmac.new(self._signing_key(day), digestmod=hashlib.sha256)
        signature_hmac.update(f"{ALGORITHM}\n{amz_date}\n{scope}\n".encode())
        return _SigningWindow(signed_at, expires_in, tuple(auth_parameters), signature_hmac)


class HeaderSigner(_BucketSigner):
    """Signs requests for the objects of one bucket in their Authorization header.

    `endpoint_url` is the S3 endpoint as the server reaches it. The request must send
    exactly the headers returned, because each of them is signed.
    """

    def sign(
        self,
        method: str,
        key: str,
        *,
        headers: dict[str, str],
        body: bytes = b"",
        now: float | None = None,
    ) -> tuple[str, dict[str, str]]:
        """Return the object's URL and the headers to send, `headers` among them, signed.

        The names in `headers` are sent as given and signed in lowercase. `now` is a Unix
        time, the present by default.
        """
        url, path = self.object_url(key)
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = amz_date[:8]
        scope = f"{day}/{self._region}/{SERVICE}/aws4_request"
        payload_hash = hashlib.sha256(body).hexdigest()

        signed = {
            **headers,
            "host": self._host,
            "x-amz-content-sha256": payload_hash,
            "x-amz-date": amz_date,
        }
        if self._session_token is not None:
            signed["x-amz-security-token"] = self._session_token
        # Values are trimmed and their inner runs of spaces collapsed, as SigV4 requires.
        canonical = sorted(
            (name.lower(), " ".join(value.split())) for name, value in signed.items()
        )
        signed_names = ";".join(name for name, _ in canonical)
        canonical_headers = "".join(f"{name}:{value}\n" for name, value in canonical)
        canonical_request = (
            f"{method}\n{path}\n\n{canonical_headers}\n{signed_names}\n{payload_hash}"
        )
        request_hash = hashlib.sha256(canonical_request.encode()).hexdigest()
        string_to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{request_hash}"
        signature = hmac.new(self._signing_key(day), string_to_sign.encode(), hashlib.sha256)
        signed["Authorization"] = (
            f"{ALGORITHM} Credential={self._access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature.hexdigest()}"
        )
        return url, signed


@dataclass(frozen=True)
class _SigningWindow:
    """Signing state shared by every URL signed at one time with one expiry."""

    signed_at: int
    expires_in: int
    auth_parameters: tuple[tuple[str, str], ...]
    # An HMAC keyed with the day's signing key that has read the start of the string to
    # sign. Each URL copies it and adds its canonical request's hash.
    signature_hmac: hmac.HMAC


def _hmac_sha256(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


# Parameter names and values repeat from URL to URL (types, "inline"), and quote() is slow.
@functools.lru_cache(maxsize=1024)
def _encode_query(text: str) -> str:
    return quote(text, safe=QUERY_SAFE)


def _host_header(scheme: str, hostname: str, port: int | None) -> str:
    """Return the Host header a client sends: lowercase, without a default port."""
    host = f"[{hostname}]" if ":" in hostname else hostname
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return host


def _check_virtual_host_bucket(bucket: str, hostname: str) -> None:
    if not _HOST_LABEL_BUCKET.fullmatch(bucket):
        raise ValueError(
            f"bucket {bucket!r} cannot be addressed virtual-host style: expected 3 to 63 "
            "lowercase letters, digits and hyphens. Use path-style addressing."
        )
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return
    raise ValueError(
        f"S3 endpoint host {hostname!r} is an IP address, so it cannot carry the bucket name. "
        "Use path-style addressing."
    )
