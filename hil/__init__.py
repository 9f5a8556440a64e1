"""Hardware-in-the-loop: simulated secondaries, faulty wires and the bench runner.

The agent flashes secondaries through :mod:`client.secondaries` (UDS over
CAN, the STM32 ROM bootloader over a UART). This package gives those flashers
something to talk to without a vehicle, and runs the same checks on a lab
bench with real ECUs:

* :mod:`hil.uds_ecu`: a UDS ECU with an A/B bootloader on a python-can bus,
  its flash banks and boot state in files (so a power loss keeps them);
* :mod:`hil.stm32_bootloader`: the STM32 system bootloader (AN3155) on a pty;
* :mod:`hil.wire_time`: how long frames and bytes take on 500 kbit/s CAN,
  CAN FD 500k/2M and 115200 baud serial, so simulated flashes take real time;
* :mod:`hil.can_bus`: virtual CAN wires with that timing and fault injection
  (dropped or corrupted frames, bus-off);
* :mod:`hil.bench_file`, :mod:`hil.runner`, :mod:`hil.junit`, :mod:`hil.cli`:
  ``uptake hil run BENCH.toml [--junit OUT.xml] [--json]``;
* :mod:`hil.labgrid_adapter`: reuse a labgrid-managed bench (optional).

``hil`` may use ``client`` and ``signing``, never ``server``.
"""
