"""Start JupyterLab on the workbook from the project's environment: ``make lab``.

    python -m labseg.lab                       notebooks/ on http://127.0.0.1:8888 (or the next free port)
    python -m labseg.lab --port 9000 --root DIR --token TOKEN --no-browser

It serves on the loopback interface only, checks that the ``labseg`` kernel (the one the notebooks'
metadata select, registered in the environment by ``make install``) is there, prints the URL with
its token and then becomes the Jupyter server (Ctrl-C stops it). The browser test
(tests/test_browser.py) starts the server through :func:`lab_command`, the same command line.
"""
from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

from labseg.config import PROJECT_ROOT

KERNEL_NAME = "labseg"
KERNEL_DISPLAY_NAME = "Python (labseg)"
INSTALL_KERNEL = (f"python -m ipykernel install --sys-prefix --name {KERNEL_NAME} "
                  f"--display-name '{KERNEL_DISPLAY_NAME}'")


class LabError(RuntimeError):
    """The server cannot start as asked (no kernel, no free port); the message says what to do."""


def check_kernel() -> str:
    """The ``labseg`` kernelspec's directory; raises :class:`LabError` when it is not registered."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise LabError(f"the Jupyter kernel {KERNEL_NAME!r}, which the notebooks select, is not registered "
                       f"in {sys.prefix}: run `make install` (or `{INSTALL_KERNEL}` in this environment)") from None
    if spec.argv and os.path.normpath(spec.argv[0]) != os.path.normpath(sys.executable):
        print(f"labseg lab: warning: kernel {KERNEL_NAME!r} ({spec.resource_dir}) runs {spec.argv[0]}, "
              f"not this environment's {sys.executable}", file=sys.stderr)
    return spec.resource_dir


def free_port(start: int = 8888, tries: int = 50, host: str = "127.0.0.1") -> int:
    """The first port from ``start`` that can be bound on ``host`` (0: any free port)."""
    for port in ([0] if start == 0 else range(start, start + tries)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise LabError(f"no free port on {host} in {start}-{start + tries - 1}")


def lab_command(root: str | Path, port: int, token: str, *, open_browser: bool = False,
                extra: list[str] | tuple = ()) -> list[str]:
    """The ``jupyter lab`` command line: this interpreter, loopback only, ``root`` served, given token."""
    cmd = [sys.executable, "-m", "jupyterlab",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--ServerApp.root_dir={Path(root).resolve()}", f"--IdentityProvider.token={token}",
           f"--ServerApp.open_browser={open_browser}",
           f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")         # containers and CI run as root
    return cmd + list(extra)


def lab_url(port: int, token: str, path: str = "lab") -> str:
    return f"http://127.0.0.1:{port}/{path}?token={token}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labseg.lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(PROJECT_ROOT / "notebooks"), help="folder served (default: notebooks/)")
    parser.add_argument("--port", type=int, default=8888, help="first port tried (default 8888; 0: any free port)")
    parser.add_argument("--token", default=None, help="login token (default: a new random one)")
    browser = parser.add_mutually_exclusive_group()
    browser.add_argument("--browser", dest="browser", action="store_true", default=None,
                         help="open a web browser (default: only when a display is available)")
    browser.add_argument("--no-browser", dest="browser", action="store_false")
    args, extra = parser.parse_known_args(argv)
    try:
        root = Path(args.root).expanduser()
        if not root.is_dir():       # JupyterLab would say so only after the login URL was printed
            raise LabError(f"--root {root.resolve()} is not a folder; give the folder to serve "
                           "(default: the project's notebooks/)")
        check_kernel()
        port = free_port(args.port)
    except LabError as e:
        sys.exit(f"labseg lab: {e}")
    token = args.token or secrets.token_hex(24)
    open_browser = args.browser if args.browser is not None else bool(
        sys.platform == "darwin" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    cmd = lab_command(args.root, port, token, open_browser=open_browser, extra=extra)
    print(f"labseg lab: JupyterLab on {Path(args.root).resolve()} with kernel {KERNEL_DISPLAY_NAME!r}\n"
          f"labseg lab: open {lab_url(port, token)}\n"
          "labseg lab: Ctrl-C stops the server", flush=True)
    if os.name == "nt":
        # Windows' execv quotes nothing (a path with a space, C:\Users\Ana Maria\..., splits into two
        # arguments) and does not replace this process: the server runs as a child instead.
        import subprocess
        try:
            sys.exit(subprocess.call(cmd))
        except KeyboardInterrupt:
            sys.exit(130)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
