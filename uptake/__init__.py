"""Uptake: Uptane-style secure over-the-air updates for vehicles.

This package holds only the command-line entry point and the end-to-end
demo. The product lives in the sibling packages:

* ``signing``: keys, signers, TUF/Uptane metadata and manifest formats;
* ``server``: image repository, director, fleet database, HTTP API;
* ``client``: the in-vehicle agent (Uptane primary) and its secondaries;
* ``hil``: ECU simulators, transports with fault injection, bench runner.
"""

__version__ = "0.1.0"
