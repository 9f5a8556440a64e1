"""``uptake demo``: one whole update story on loopback, told step by step.

1. Key ceremony: a new server data directory (online keys) and a separate
   offline-keys directory (image root/targets, director root).
2. Start ``uptake server run`` on 127.0.0.1 (a child process).
3. Provision a vehicle: primary ``rpi-gateway`` ECU with A/B slots and one
   ``stm32f4-bms`` secondary; register its ECU public keys with the director.
4. Publish sample firmware 1.0.0, direct the vehicle to it, run the agent:
   full verification, install into the inactive slot, health check, commit.
5. The same with 1.1.0, now as a delta: the server makes one in the
   background from the 1.0.0 the vehicle reported, and the agent applies it
   from its active slot into the inactive one.
6. Publish 2.0.0, whose power-on self-test fails: the agent installs it,
   the health check fails on every trial boot, the bootloader falls back,
   and the vehicle reports the rollback; the server marks it failed.

Exits 0 only when every step happened as described.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

# Both sides run in this process. Imported here, not when the demo starts, so that an
# install without the server or client extra gets the `uptake` command's clear
# "install uptake[server,client]" message (uptake.cli) instead of a traceback mid-demo.
from client.agent import Agent
from client.config import load_config
from client.provisioning import EcuSpec, provision_vehicle
from server.api_client import AdminClient
from server.config import ServerConfig
from server.release import publish_image
from server.service import init_server
from signing.exceptions import UptakeError
from signing.keys import load_signer

_REPO = Path(__file__).resolve().parent.parent
_SAMPLES = _REPO / "firmware-samples"
_IMAGES = {"rpi-gateway": "gateway.elf", "stm32f4-bms": "bms.bin"}


class DemoFailed(UptakeError):
    """A step of the demo did not do what it should; says which."""


def _step(title: str) -> None:
    click.echo("")
    click.secho(f"== {title}", bold=True)


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailed(what)
    click.secho(f"   ok: {what}", fg="green")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(url: str, proc: subprocess.Popen[bytes], ca_cert: Path) -> None:
    import urllib3

    http = urllib3.PoolManager(retries=False, timeout=1.0, ca_certs=str(ca_cert))
    for _ in range(200):
        if proc.poll() is not None:
            raise DemoFailed(f"the server exited with status {proc.returncode}")
        try:
            if http.request("GET", f"{url}/health").status == 200:
                return
        except urllib3.exceptions.HTTPError:
            time.sleep(0.1)
    raise DemoFailed("the server did not come up within 20 s")


def run_demo(workdir: Path) -> None:
    if not _SAMPLES.is_dir():
        raise DemoFailed(
            f"sample firmware not found at {_SAMPLES}: run the demo from a clone of the repository"
        )
    password = secrets.token_urlsafe(16)
    env = {**os.environ, "UPTAKE_SERVER_KEY_PASSWORD": password, "UPTAKE_KEY_PASSWORD": password}
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    config = ServerConfig(workdir / "server", "127.0.0.1", port)
    offline = workdir / "offline-keys"

    _step("1. Key ceremony")
    init_server(config, offline, password.encode(), password.encode())
    click.echo(
        f"   online keys (image snapshot/timestamp, director targets/snapshot/timestamp): {config.keys_dir}"
    )
    click.echo(
        f"   offline keys (image root/targets, director root), kept away from the server: {offline}"
    )
    ca_cert = config.server_ca_cert
    click.echo(
        f"   a throwaway server CA ({ca_cert}) and TLS certificate for 127.0.0.1; the device CA "
        "that signs vehicles' client certificates; the first admin token (only its hash kept)"
    )

    _step(f"2. Server on {url}")
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "uptake", "server", "run", "--data-dir", str(config.data_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_up(url, proc, ca_cert)
        click.echo(
            "   HTTPS; image repository at /image/, director at /director/<VIN>/ (vehicles prove "
            "their VIN with a client certificate), operator API at /api/v1/ (tokens with roles)"
        )
        admin = AdminClient.from_token_file(url, config.admin_token_path, ca_cert=ca_cert)
        targets_key = load_signer(offline / "image-targets.key", password.encode())
        image_root = (offline / "image-root.json").read_bytes()

        _step("3. Provision vehicle DEMO-VIN-0001 (primary GW-0001 + secondary BMS-0001)")
        vehicle_dir = workdir / "vehicle"
        selftest = [sys.executable, "-m", "uptake.firmware_info", "selftest", "{slot_path}"]
        agent_config = provision_vehicle(
            vehicle_dir,
            vin="DEMO-VIN-0001",
            server_url=url,
            primary=EcuSpec("GW-0001", "rpi-gateway"),
            secondaries=[EcuSpec("BMS-0001", "stm32f4-bms")],
            image_root=image_root,
            director_root=(offline / "director-root.json").read_bytes(),
            password=password.encode(),
            health_check=[selftest],
            secondary_health_check=[selftest],
            server_ca=ca_cert.read_bytes(),
        )
        import json

        answer = admin.request(
            "POST",
            "/api/v1/vehicles",
            json_body=json.loads((vehicle_dir / "registration.json").read_bytes()),
        )
        (vehicle_dir / "tls" / "client.crt").write_text(answer["tls_certificate"])
        click.echo(
            "   ECU keys and a TLS key generated on the vehicle; public keys registered, and the "
            "device CA signed its CSR: the client certificate binds DEMO-VIN-0001"
        )
        click.echo(f"   agent config {agent_config}")
        os.environ["UPTAKE_KEY_PASSWORD"] = password
        agent = Agent(
            load_config(agent_config),
            password.encode(),
            narrate=lambda m: click.echo(f"   [agent] {m}"),
        )

        def release(version: str) -> dict[str, str]:
            paths = {}
            for hw, name in _IMAGES.items():
                pub = publish_image(
                    admin, _SAMPLES / hw / version / name, [hw], version, [targets_key], image_root
                )
                click.echo(
                    f"   published {pub.filepath}: {pub.length} bytes, release counter {pub.release_counter},"
                    f" signed with the offline targets key (targets v{pub.targets_version})"
                )
                paths[hw] = pub.filepath
            admin.request(
                "POST",
                "/api/v1/vehicles/DEMO-VIN-0001/assignments",
                json_body={"ecu_serial": "GW-0001", "filepath": paths["rpi-gateway"]},
            )
            admin.request(
                "POST",
                "/api/v1/vehicles/DEMO-VIN-0001/assignments",
                json_body={"ecu_serial": "BMS-0001", "filepath": paths["stm32f4-bms"]},
            )
            click.echo("   director: GW-0001 and BMS-0001 assigned; per-vehicle targets re-signed")
            return paths

        def wait_for_delta(filepath: str) -> None:
            """The server makes deltas in the background from what the fleet runs; show the one for the gateway."""
            for _ in range(300):
                listing = admin.request("GET", "/api/v1/deltas")
                for job in listing["jobs"]:
                    if (
                        job["result_filepath"] == filepath
                        and job["status"] != "queued"
                        and job["status"] != "running"
                    ):
                        click.echo(
                            f"   server made a delta to {filepath}: {job['status']}, "
                            f"{job['delta_length']} bytes instead of {job['result_length']} ({job['detail']})"
                        )
                        return
                time.sleep(0.1)
            raise DemoFailed(f"no delta job for {filepath} finished within 30 s")

        def server_view() -> dict[str, dict[str, str]]:
            rec = admin.request("GET", "/api/v1/vehicles/DEMO-VIN-0001")
            return {
                e["serial"]: {
                    "installed": e["installed"]["filepath"],
                    "last": e["last_install"]["result"],
                }
                for e in rec["ecus"]
            }

        for n, version in ((4, "1.0.0"), (5, "1.1.0")):
            _step(f"{n}. Release {version} and update the vehicle")
            paths = release(version)
            if version != "1.0.0":  # from 1.0.0 on, the vehicle runs something to diff from
                wait_for_delta(paths["rpi-gateway"])
            report = agent.run_cycle()
            _expect(
                report.outcomes.get("GW-0001") is not None
                and report.outcomes["GW-0001"].result == "installed",
                f"primary installed {paths['rpi-gateway']} and committed it after a healthy boot",
            )
            if version != "1.0.0":
                _expect(
                    report.outcomes["GW-0001"].method == "delta",
                    "the primary took the delta from its installed image, applied it from its active slot",
                )
            _expect(
                report.outcomes.get("BMS-0001") is not None
                and report.outcomes["BMS-0001"].result == "installed",
                f"secondary verified (partial verification) and installed {paths['stm32f4-bms']}",
            )
            view = server_view()
            _expect(
                view["GW-0001"]["installed"] == paths["rpi-gateway"]
                and view["BMS-0001"]["installed"] == paths["stm32f4-bms"],
                "the server's record shows both ECUs on the new version (from the signed manifest)",
            )

        _step("6. Release 2.0.0, whose power-on self-test fails")
        good = server_view()["GW-0001"]["installed"]
        paths = release("2.0.0")
        report = agent.run_cycle()
        outcome = report.outcomes.get("GW-0001")
        _expect(
            outcome is not None and outcome.result == "rolled_back",
            f"primary rolled back automatically: {outcome.detail if outcome else ''}",
        )
        secondary = report.outcomes.get("BMS-0001")
        _expect(
            secondary is not None and secondary.result == "rolled_back",
            "secondary fell back to its previous bank",
        )
        view = server_view()
        _expect(
            view["GW-0001"]["installed"] == good and view["GW-0001"]["last"] == "rolled_back",
            f"the server's record shows GW-0001 back on {good}, last install rolled back",
        )
        rec = admin.request("GET", "/api/v1/vehicles/DEMO-VIN-0001")
        failed = [a for a in rec["assignments"] if a["filepath"] == paths["rpi-gateway"]]
        _expect(
            bool(failed) and failed[0]["status"] == "failed",
            "the assignment of 2.0.0 is marked failed",
        )
        again = agent.run_cycle()
        _expect(not again.outcomes, "the next poll does not retry the broken release")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@click.command("demo")
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the temporary directory (server data, vehicle state) for inspection.",
)
def demo(keep: bool) -> None:
    """Run a whole update story on loopback: publish, direct, verify, install, report, roll back."""
    workdir = Path(tempfile.mkdtemp(prefix="uptake-demo-"))
    try:
        run_demo(workdir)
    except UptakeError as exc:  # DemoFailed, or whatever a step refused
        click.secho(
            f"\nDEMO FAILED: {exc}\n(server log: {workdir / 'server.log'})", fg="red", err=True
        )
        keep = True
        sys.exit(1)
    finally:
        if keep:
            click.echo(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    click.secho("\nDemo complete: every step verified.", bold=True, fg="green")
