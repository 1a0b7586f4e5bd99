// Small progressive enhancements; every page works without them.
(function () {
  "use strict";

  // A region with data-live="<url>" is replaced by that URL's fragment every data-interval ms.
  function watch(region) {
    var interval = parseInt(region.dataset.interval, 10) || 5000;
    var timer = null;

    function later() {
      timer = window.setTimeout(refresh, interval);
    }

    function refresh() {
      timer = null;
      if (document.hidden) {
        return later();
      }
      fetch(region.dataset.live, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { "X-Requested-With": "fetch", Accept: "text/html" },
      })
        .then(function (response) {
          if (response.status === 401) {
            window.location.reload(); // session ended: the page redirects to the login
            return null;
          }
          if (!response.ok) {
            throw new Error("HTTP " + response.status);
          }
          return response.text();
        })
        .then(function (html) {
          if (html !== null) {
            region.innerHTML = html;
            region.removeAttribute("data-stale");
          }
        })
        .catch(function () {
          region.setAttribute("data-stale", "");
        })
        .then(later);
    }

    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && timer !== null) {
        window.clearTimeout(timer);
        refresh();
      }
    });
    later();
  }

  // Forms with data-confirm ask first (reboots, whole-school commands, removals).
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });

  // Filter selects apply at once; the Filter button remains for keyboards and no-JS.
  document.addEventListener("change", function (event) {
    var field = event.target;
    if (field instanceof HTMLSelectElement && field.form && field.form.classList.contains("filters")) {
      field.form.requestSubmit();
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(watch);
  });
})();
