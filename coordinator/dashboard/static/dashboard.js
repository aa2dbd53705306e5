// Live refresh: a page whose <body data-live="N"> is fetched again every N seconds and its
// <main> swapped in place. Nothing refreshes while the operator is typing in a form.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-live") || "0", 10);
  if (!seconds) { return; }
  function busy() {
    var el = document.activeElement;
    return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT");
  }
  function refresh() {
    if (document.hidden || busy()) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var page = new DOMParser().parseFromString(html, "text/html");
        var fresh = page.getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main) { main.innerHTML = fresh.innerHTML; }
        var live = page.body.getAttribute("data-live");
        if (live === "0") { window.clearInterval(timer); }
      })
      .catch(function () { /* the next tick tries again */ });
  }
  var timer = window.setInterval(refresh, seconds * 1000);
})();
