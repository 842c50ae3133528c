"""A real browser for the tests: headless Chromium driven by selenium, skipped with a reason where missing."""

from __future__ import annotations

import _socket
import importlib.util
import ipaddress
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1600",
)
# every image of the page, as the browser sees it
IMAGES_SCRIPT = """
return Array.from(document.querySelectorAll('img.curve, img.tile')).map(image => ({
    kind: image.className, complete: image.complete, width: image.naturalWidth, alt: image.alt}));
"""
# the cells of every results table: [table][row][cell]
TABLES_SCRIPT = """
return Array.from(document.querySelectorAll('table.results')).map(table => ({
    head: Array.from(table.tHead.rows[0].cells).map(cell => cell.textContent),
    rows: Array.from(table.tBodies[0].rows).map(row => Array.from(row.cells).map(cell => cell.textContent))}));
"""


def browser_missing() -> str | None:
    """Why the real-browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium not installed: pip install selenium"
    for program in (CHROMIUM, CHROMEDRIVER):
        if not program.is_file():
            return f"{program} missing, chromium not installed: apt-get install chromium chromium-driver"
    return None


def allow_loopback(patcher: pytest.MonkeyPatch) -> None:
    """Let selenium reach chromedriver on this machine; conftest's block stays on for any other address."""
    blocked_connect = socket.socket.connect
    blocked_create = socket.create_connection
    blocked_lookup = socket.getaddrinfo

    def loopback(host: object) -> bool:
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def connect(self, address):
        if isinstance(address, tuple) and loopback(address[0]):
            return _socket.socket.connect(self, address)
        return blocked_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if loopback(host):
            return _socket.getaddrinfo(host, *args, **kwargs)
        return blocked_lookup(host, *args, **kwargs)

    def create_connection(address, timeout=None, *args, **kwargs):
        if not loopback(address[0]):
            return blocked_create(address, timeout, *args, **kwargs)
        error = None
        for family, kind, protocol, _, target in _socket.getaddrinfo(*address[:2], 0, socket.SOCK_STREAM):
            connection = socket.socket(family, kind, protocol)
            connection.settimeout(timeout)
            try:
                connection.connect(target)
            except OSError as failure:
                connection.close()
                error = failure
            else:
                return connection
        raise error

    patcher.setattr(socket.socket, "connect", connect)
    patcher.setattr(socket, "getaddrinfo", getaddrinfo)
    patcher.setattr(socket, "create_connection", create_connection)


def chromium(profile: Path):
    """A headless Chromium (selenium) for as long as the generator runs; skips the test where none is installed."""
    missing = browser_missing()
    if missing:
        pytest.skip(f"real-browser check skipped, {missing}")
    from selenium import webdriver  # noqa: PLC0415 (only where the browser is installed)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    with pytest.MonkeyPatch.context() as patcher:
        allow_loopback(patcher)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())


def broken_images(images: list[dict[str, object]]) -> list[dict[str, object]]:
    return [image for image in images if not image["complete"] or image["width"] == 0]
