// Live fragments: every element with data-live is re-fetched every two seconds and its content
// replaced with the server's escaped HTML. No build step, no script from elsewhere.
(function () {
  function refresh() {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      fetch(el.dataset.live, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) { el.innerHTML = html; } })
        .catch(function () {});
    });
  }
  setInterval(refresh, 2000);
})();
