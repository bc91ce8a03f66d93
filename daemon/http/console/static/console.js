// pacs-ai console: refresh the page's live part in place (no reload), keep open <details>,
// pause while the tab is hidden, and go to the login form when the session ends.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !live.dataset.live) { return; }
  var every = Math.max(1, parseInt(live.dataset.every || "3", 10)) * 1000;
  var busy = false;

  function openDetails() {
    return Array.prototype.map.call(live.querySelectorAll("details[open][id]"), function (d) { return d.id; });
  }

  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(live.dataset.live, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401) {
          var here = location.pathname + location.search;
          location.assign("/console/login?why=session+expired&next=" + encodeURIComponent(here));
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html === null) { return; }
        var keep = openDetails();
        live.innerHTML = html;
        keep.forEach(function (id) {
          var d = document.getElementById(id);
          if (d) { d.open = true; }
        });
        live.dataset.refreshed = String(Date.now());
      })
      .catch(function () { /* the server is away for a moment: try again next time */ })
      .then(function () { busy = false; });
  }

  setInterval(refresh, every);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) { refresh(); } });
})();
