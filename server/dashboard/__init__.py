"""The web dashboard: server-rendered pages for release engineers and fleet operators.

Served by the server itself under ``/dashboard/`` (:mod:`server.dashboard.routes`),
from the same route table and access checks as the API
(:mod:`server.api.access`): every page declares the
:class:`~server.roles.Permission` it needs, and an operator logs in with a
token or the account's password (:mod:`server.operator_passwords`) to get a
session cookie (:mod:`server.web_sessions`). Pages are Jinja2 templates
(autoescaped) with one stylesheet and one small script that polls a JSON
view of the page every few seconds and updates it in place; everything
works without the script too, by reloading.

What each page reads comes from :mod:`server.dashboard.queries`: counts are
aggregated in SQL (``GROUP BY``), lists are paged, so a page costs the same
at 100 vehicles as at 100,000 (``bench/dashboard_render.py``).
"""
