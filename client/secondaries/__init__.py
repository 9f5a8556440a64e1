"""Secondary ECUs: the :class:`~client.secondaries.base.Secondary` interface and its transports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from client.secondaries.base import Secondary, SecondaryError

if TYPE_CHECKING:
    from client.config import AgentConfig


def open_secondaries(config: AgentConfig, password: bytes) -> list[Secondary]:
    """Instantiate every secondary the configuration lists."""
    from client.secondaries.local import LocalSecondary

    result: list[Secondary] = []
    for sec in config.secondaries:
        if sec.transport == "local":
            health = sec.options.get("health_check", [])
            result.append(
                LocalSecondary(
                    config.path(sec.directory),
                    sec.ecu_serial,
                    sec.hardware_id,
                    config.vin,
                    password,
                    health_check=[list(c) for c in health],
                    bootlimit=int(sec.options.get("bootlimit", 1)),
                )
            )
        elif sec.transport == "uds":
            from client.secondaries.uds_secondary import UdsSecondary

            result.append(UdsSecondary(sec.ecu_serial, sec.hardware_id, sec.options))
        else:  # validated by the config loader
            raise SecondaryError(
                f"secondary {sec.ecu_serial}: unsupported transport {sec.transport!r}"
            )
    return result


__all__ = ["Secondary", "SecondaryError", "open_secondaries"]
