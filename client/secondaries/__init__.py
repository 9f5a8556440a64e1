"""Secondary ECUs: the :class:`~client.secondaries.base.Secondary` interface and its transports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from client.secondaries.base import EcuStatus, Secondary, SecondaryError

if TYPE_CHECKING:
    from client.config import AgentConfig


def open_secondaries(config: AgentConfig, password: bytes) -> list[Secondary]:
    """Instantiate every secondary the configuration lists (options already typed and checked)."""
    from client.config import LocalSecondaryConfig
    from client.secondaries.local import LocalSecondary

    result: list[Secondary] = []
    for sec in config.secondaries:
        if isinstance(sec, LocalSecondaryConfig):
            result.append(
                LocalSecondary(
                    config.path(sec.state_directory),
                    sec.ecu_serial,
                    sec.hardware_id,
                    config.agent.vin,
                    password,
                    health_check=sec.options.health_check,
                    bootlimit=sec.options.bootlimit,
                )
            )
        else:
            from client.secondaries.uds_secondary import UdsSecondary

            result.append(UdsSecondary(sec.ecu_serial, sec.hardware_id, sec.options))
    return result


__all__ = ["EcuStatus", "Secondary", "SecondaryError", "open_secondaries"]
