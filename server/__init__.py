"""The Uptake server: image repository, director, fleet database, HTTP API.

One aiohttp process (:mod:`server.api`) serves

* the **image repository** (:mod:`server.image_repository`): TUF metadata
  and firmware images, laid out as static files with consistent snapshots.
  Release engineers sign new targets metadata offline
  (:mod:`server.release`); the server only verifies it against root and
  adds snapshot + timestamp with its online keys;
* the **director** (:mod:`server.director`): per-vehicle targets, snapshot
  and timestamp signed with online keys, regenerated only when what a
  vehicle should install changes;
* the **fleet** (:mod:`server.fleet`): vehicles, ECUs and their keys,
  assignments, verified vehicle manifests and the security events they carry;
  the **inventory ledger** (:mod:`server.ledger`), each ECU's history with the
  signed manifests that reported it, and the fleet's paged lists
  (:mod:`server.inventory`);
* **identity and access** (:mod:`server.api.access`): TLS with vehicle client
  certificates (:mod:`server.certificates`, :mod:`server.identities`) and
  operator tokens with roles (:mod:`server.accounts`, :mod:`server.roles`);
  every change is in the hash-chained audit log (:mod:`server.audit`);
* the **API's description**: an OpenAPI 3.1 document made from the route
  table (:mod:`server.api.openapi`).

Nothing here is imported by the in-vehicle agent (``client``).
"""
