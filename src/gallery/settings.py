"""The gallery's settings, read once from the environment when the web app or worker starts."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

# S3 rejects presigned URLs that live longer than 7 days (SigV4 limit).
MAX_PRESIGNED_URL_SECONDS = 7 * 24 * 3600

# A presigned POST form that lives longer than this gives a leaked form too much time.
MAX_UPLOAD_FORM_SECONDS = 300

MIN_SECRET_KEY_LENGTH = 32
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


logger = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting is missing or has an invalid value."""


@dataclass(frozen=True)
class Settings:
    """Every setting of the web app and the worker.

    Each field is read from its variable in ENV_NAMES, or when that is unset from its old
    name in OLD_NAMES or a standard name in STANDARD_NAMES.
    """

    # Services
    redis_url: str = ""
    s3_endpoint_url: str = ""
    # The S3 endpoint as the browser reaches it: SigV4 signs the host, so presigned forms
    # and URLs must name it. Defaults to s3_endpoint_url.
    s3_public_endpoint_url: str = ""
    s3_bucket: str = "gallery"
    s3_region: str = "us-east-1"
    aws_access_key_id: str = ""
    aws_secret_access_key: str = ""

    # Web app
    host: str = "127.0.0.1"
    port: int = 8000
    # The address people open, for the bucket's CORS rules. Defaults to http://host:port.
    public_url: str = ""
    secret_key: str = ""
    # Marks the session and CSRF cookies Secure; `cookies_secure` also turns it on for HTTPS.
    secure_cookies: bool = False
    # Anyone who reaches the app may create an account; false leaves that to
    # `gallery create-user`.
    open_signup: bool = True
    # Comma-separated IP addresses and CIDR networks of the reverse proxies in front of the
    # app. Only a request whose direct peer is in this list has its client address taken
    # from X-Forwarded-For. Empty trusts no proxy.
    trusted_proxies: str = ""
    data_dir: Path = Path(".gallery")

    # Uploads and images
    max_upload_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    # The maximum of frames times canvas pixels for an animated GIF, PNG or WebP, because
    # playing an animation decodes every frame. The default is 1000 frames of 1920x1080.
    max_animation_pixels: int = 1000 * 1920 * 1080
    upload_form_seconds: int = 300
    url_expiry_seconds: int = 600
    # Presigned GET URLs are signed at the start of the current window of this many seconds,
    # so a thumbnail's URL, and the browser's cached copy, stay the same within the window.
    # Each URL stays valid at least url_expiry_seconds minus this after it is handed out.
    url_window_seconds: int = 300
    # The longer side of a grid thumbnail (a second one is twice this, for dense screens),
    # and of the image the viewer shows, in pixels.
    thumbnail_size: int = 256
    display_size: int = 1600
    rendition_quality: int = 80
    page_size: int = 60
    # Uploads one page sends to S3 at once; the others wait in its list.
    parallel_uploads: int = 3
    # Days an image stays in the trash before the worker deletes it forever.
    trash_retention_days: int = 30

    # Abuse limits
    # Uploads per user that may wait for verification at once (issued or uploaded).
    max_pending_uploads: int = 50
    # Upload forms one user may request per minute.
    upload_forms_per_minute: int = 120
    # Failed sign-ins allowed in 15 minutes for one username, and from one address.
    signin_failures_per_account: int = 10
    signin_failures_per_address: int = 50
    # Share links a user may have active at once (neither expired nor revoked).
    max_active_shares: int = 50
    # Views of shared pages allowed per minute from one address, whichever link they open.
    share_views_per_minute: int = 120

    # Share links
    # How long each image URL on a shared page stays valid after the page view that signed
    # it, in seconds. Revoking a link, its expiry or deleting an image stops access to the
    # images after at most this long.
    share_url_expiry_seconds: int = 300

    # Quotas: the default limits of each user, counting originals and every rendition;
    # 0 means no limit. `gallery set-quota` sets other limits for one user.
    quota_bytes: int = 10 * 1024**3
    quota_images: int = 100_000

    # Worker
    # Processes that decode images in each worker; 0 means one per CPU core.
    worker_processes: int = 0
    purge_grace_seconds: int = 600
    # How often the sweep looks for stuck, unreported and abandoned uploads; divides 60.
    sweep_interval_seconds: int = 60

    # Logs: "text" for people, "json" for one JSON object per line; a standard level name.
    log_format: str = "text"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables, failing with the variable's name."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            found = _read_variable(environ, field.name)
            if found is not None:
                name, raw = found
                values[field.name] = _parse(name, raw, type(getattr(cls, field.name)))
                if field.name in URL_SCHEMES and raw:
                    _check_url(name, raw, URL_SCHEMES[field.name])
        return cls(**values).validated()

    def validated(self) -> Settings:
        """Return these settings checked, with a URL expiry over 7 days cut to 7 days."""
        if self.url_expiry_seconds < 1:
            raise SettingsError(
                f"GALLERY_URL_EXPIRY_SECONDS={self.url_expiry_seconds} is invalid: "
                "presigned URLs must live at least 1 second"
            )
        if self.url_expiry_seconds > MAX_PRESIGNED_URL_SECONDS:
            logger.warning(
                "GALLERY_URL_EXPIRY_SECONDS=%d is over the SigV4 maximum of %d seconds "
                "(7 days); using %d",
                self.url_expiry_seconds,
                MAX_PRESIGNED_URL_SECONDS,
                MAX_PRESIGNED_URL_SECONDS,
            )
            return replace(self, url_expiry_seconds=MAX_PRESIGNED_URL_SECONDS).validated()
        if not 1 <= self.url_window_seconds < self.url_expiry_seconds:
            raise SettingsError(
                f"GALLERY_URL_WINDOW_SECONDS={self.url_window_seconds} is out of range: "
                "it must be at least 1 and less than GALLERY_URL_EXPIRY_SECONDS="
                f"{self.url_expiry_seconds}, so every URL is still valid when it is handed out"
            )
        if not 1 <= self.share_url_expiry_seconds <= MAX_PRESIGNED_URL_SECONDS:
            raise SettingsError(
                f"GALLERY_SHARE_URL_EXPIRY_SECONDS={self.share_url_expiry_seconds} is out of "
                f"range: shared image URLs live from 1 to {MAX_PRESIGNED_URL_SECONDS} seconds"
            )
        if not 1 <= self.upload_form_seconds <= MAX_UPLOAD_FORM_SECONDS:
            raise SettingsError(
                f"GALLERY_UPLOAD_FORM_SECONDS={self.upload_form_seconds} is out of range: "
                f"upload forms live from 1 to {MAX_UPLOAD_FORM_SECONDS} seconds"
            )
        positive = (
            "max_upload_bytes",
            "max_pixels",
            "max_animation_pixels",
            "display_size",
            "thumbnail_size",
            "page_size",
            "parallel_uploads",
            "trash_retention_days",
            "port",
            "max_pending_uploads",
            "upload_forms_per_minute",
            "signin_failures_per_account",
            "signin_failures_per_address",
            "max_active_shares",
            "share_views_per_minute",
        )
        self._check_choices()
        for name in ("quota_bytes", "quota_images", "purge_grace_seconds"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"{ENV_NAMES[name]}={getattr(self, name)} is invalid: expected 0 or more"
                )
        if self.worker_processes < 0:
            raise SettingsError(
                f"GALLERY_WORKER_PROCESSES={self.worker_processes} is invalid: "
                "expected 0 (one per CPU core) or more"
            )
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"{ENV_NAMES[name]} must be a positive integer")
        if not 0 <= self.rendition_quality <= 100:
            raise SettingsError(
                f"GALLERY_RENDITION_QUALITY={self.rendition_quality} is invalid: "
                "expected a WebP quality from 0 to 100"
            )
        if not 1 <= self.port <= 65535:
            raise SettingsError(
                f"GALLERY_PORT={self.port} is invalid: expected a port from 1 to 65535"
            )
        if not 1 <= self.sweep_interval_seconds <= 60 or 60 % self.sweep_interval_seconds:
            raise SettingsError(
                f"GALLERY_SWEEP_INTERVAL_SECONDS={self.sweep_interval_seconds} is invalid: "
                "expected a number of seconds that divides 60, such as 10, 30 or 60"
            )
        return self

    def _check_choices(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(
                f"GALLERY_LOG_FORMAT={self.log_format!r} is invalid: expected one of "
                f"{', '.join(LOG_FORMATS)}"
            )
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(
                f"GALLERY_LOG_LEVEL={self.log_level!r} is invalid: expected one of "
                f"{', '.join(LOG_LEVELS)}"
            )
        self._check_trusted_proxies()
        if self.secret_key and len(self.secret_key) < MIN_SECRET_KEY_LENGTH:
            raise SettingsError(
                f"GALLERY_SECRET_KEY is too short ({len(self.secret_key)} characters): "
                f"expected at least {MIN_SECRET_KEY_LENGTH} random characters"
            )

    def _check_trusted_proxies(self) -> None:
        for entry in _list_entries(self.trusted_proxies):
            try:
                ipaddress.ip_network(entry)
            except ValueError as error:
                raise SettingsError(
                    f"GALLERY_TRUSTED_PROXIES={self.trusted_proxies!r} is invalid: {error}. "
                    "Expected comma-separated IP addresses or CIDR networks, "
                    "such as 10.0.0.5,192.168.1.0/24"
                ) from None

    @property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The networks of GALLERY_TRUSTED_PROXIES; a single address is a /32 or /128."""
        return tuple(ipaddress.ip_network(entry) for entry in _list_entries(self.trusted_proxies))

    @property
    def uses_embedded_services(self) -> bool:
        """Whether `gallery dev` should start its own S3 and Redis servers."""
        return not (self.redis_url or self.s3_endpoint_url or self.aws_access_key_id)

    @property
    def presign_endpoint_url(self) -> str:
        return self.s3_public_endpoint_url or self.s3_endpoint_url

    @property
    def cookies_secure(self) -> bool:
        """Whether cookies carry Secure: when set, or when people reach the app over HTTPS."""
        return self.secure_cookies or self.app_url.startswith("https://")

    @property
    def app_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def to_env(self) -> dict[str, str]:
        """Return these settings as environment variables, for a process started with them."""
        environ = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            environ[ENV_NAMES[field.name]] = str(value)
        return environ

    def require_services(self) -> Settings:
        """Return these settings after checking that every service is configured."""
        for name in ("redis_url", "s3_endpoint_url", "aws_access_key_id", "aws_secret_access_key"):
            if not getattr(self, name):
                also = " or ".join(STANDARD_NAMES.get(name, ()))
                raise SettingsError(
                    f"{ENV_NAMES[name]} is not set" + (f" (nor {also})" if also else "")
                )
        if len(self.secret_key) < MIN_SECRET_KEY_LENGTH:
            raise SettingsError(
                f"GALLERY_SECRET_KEY must be set to at least {MIN_SECRET_KEY_LENGTH} "
                "random characters"
            )
        return self


def _list_entries(value: str) -> list[str]:
    """Split a comma-separated setting into its entries, without blanks."""
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _env_name(field_name: str) -> str:
    # The credentials keep the standard AWS names, which SDKs and platforms already set.
    if field_name.startswith("aws_"):
        return field_name.upper()
    return f"GALLERY_{field_name.upper()}"


ENV_NAMES: dict[str, str] = {field.name: _env_name(field.name) for field in fields(Settings)}

# Standard names read when the GALLERY_ name is unset, in this order.
STANDARD_NAMES: dict[str, tuple[str, ...]] = {
    "redis_url": ("REDIS_URL",),
    "s3_endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "s3_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}

# Names that earlier versions read. They still work, with a warning to rename them.
OLD_NAMES: dict[str, str] = {
    "s3_endpoint_url": "S3_ENDPOINT_URL",
    "s3_public_endpoint_url": "S3_PUBLIC_ENDPOINT_URL",
    "s3_bucket": "S3_BUCKET",
    "s3_region": "S3_REGION",
}


# The URL schemes each URL setting accepts.
URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "redis_url": ("redis", "rediss", "unix"),
    "s3_endpoint_url": ("http", "https"),
    "s3_public_endpoint_url": ("http", "https"),
    "public_url": ("http", "https"),
}


def _check_url(name: str, value: str, schemes: tuple[str, ...]) -> None:
    parsed = urlsplit(value)
    if parsed.scheme not in schemes or not (parsed.netloc or parsed.path):
        # The value is left out of the message, because a Redis URL may contain a password.
        expected = " or ".join(f"{scheme}://..." for scheme in schemes)
        raise SettingsError(f"{name} is not a valid URL: expected {expected}")


def _read_variable(environ: Mapping[str, str], field_name: str) -> tuple[str, str] | None:
    """Return the name and value of the variable that sets a field, or None when none does.

    The GALLERY_ name wins over an old name, and both win over the standard names.
    """
    name = ENV_NAMES[field_name]
    old_name = OLD_NAMES.get(field_name)
    if old_name is not None and old_name in environ:
        if name in environ and environ[name] != environ[old_name]:
            raise SettingsError(
                f"{name} and {old_name} are both set, to different values: "
                f"{old_name} is the old name of {name}, so remove it"
            )
        if name not in environ:
            logger.warning("%s is deprecated: rename it to %s", old_name, name)
            return old_name, environ[old_name]
    if name in environ:
        return name, environ[name]
    for standard_name in STANDARD_NAMES.get(field_name, ()):
        if standard_name in environ:
            return standard_name, environ[standard_name]
    return None


def _parse(name: str, raw: str, kind: type) -> object:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name}={raw!r} is invalid: expected true or false")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is invalid: expected an integer") from None
    if issubclass(kind, Path):
        return Path(raw)
    return raw
