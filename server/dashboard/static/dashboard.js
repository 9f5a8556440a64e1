// Live updates: a page whose <main> has data-live-url polls that JSON every few seconds and
// replaces the HTML of each [data-live-region] the answer names (only when it changed, so that
// keyboard focus stays put). Without this script the pages still work: reload them.
"use strict";
(function () {
  var main = document.getElementById("main");
  var url = main && main.getAttribute("data-live-url");
  var status = document.querySelector("[data-live-status]");
  if (!url) { return; }
  var interval = 2000;
  function say(text) { if (status) { status.textContent = text; } }
  function apply(data) {
    var regions = data.regions || {};
    Object.keys(regions).forEach(function (name) {
      var el = document.querySelector('[data-live-region="' + name + '"]');
      if (el && el.getAttribute("data-live-html") !== regions[name]) {
        var hadFocus = el.contains(document.activeElement);
        var focusedId = hadFocus && document.activeElement.id;
        el.innerHTML = regions[name];
        el.setAttribute("data-live-html", regions[name]);
        if (focusedId) {
          var again = document.getElementById(focusedId);
          if (again) { again.focus(); }
        }
      }
    });
    var now = new Date();
    say("updated " + now.toLocaleTimeString());
    main.setAttribute("data-live-updated", String(now.getTime()));
  }
  function poll() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); throw new Error("logged out"); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(apply)
      .catch(function (e) { say("live updates paused: " + e.message); })
      .finally(function () { window.setTimeout(poll, interval); });
  }
  window.setTimeout(poll, interval);
})();
