// The Rules page's dry-run: post a study UID (JSON) or a DICOM file (multipart) to the API
// and show the decision and each rule's explanation. No inline script (CSP: 'self' only).
(function () {
  "use strict";

  function $(id) { return document.getElementById(id); }

  function show(data) {
    var c = window.cxrConsole;
    $("dry-run-error").hidden = true;
    var verdict = data.draft ? "Drafted by rule " + data.rule : (data.rule ? "Skipped by rule " + data.rule : "Skipped: no rule matched");
    var extra = [];
    if (data.draft) {
      if (data.model) extra.push("model " + data.model);
      if (data.priority !== null && data.priority !== undefined) extra.push("priority " + data.priority);
      extra.push(data.destinations === null ? "all destinations" : "to " + (data.destinations.join(", ") || "no destination"));
    }
    $("dry-run-verdict").textContent = verdict + (extra.length ? " (" + extra.join(", ") + ")" : "");
    $("dry-run-reason").textContent = data.reason;
    var body = $("dry-run-rules");
    while (body.firstChild) body.removeChild(body.firstChild);
    (data.results || []).forEach(function (r) {
      var tr = c.el("tr", { "data-rule": r.rule, "class": r.matched ? "matched" : "" });
      tr.appendChild(c.el("td", null, r.rule));
      tr.appendChild(c.el("td", null, r.matched ? "yes" : "no"));
      tr.appendChild(c.el("td", null, r.explanation));
      body.appendChild(tr);
    });
    $("dry-run-result").hidden = false;
  }

  function fail(text) {
    $("dry-run-result").hidden = true;
    var e = $("dry-run-error");
    e.textContent = text;
    e.hidden = false;
  }

  function handle(promise) {
    var c = window.cxrConsole;
    promise.then(function (resp) {
      if (!resp.ok) return c.errorText(resp).then(fail);
      return resp.json().then(show);
    }).catch(function () { fail("node unreachable"); });
  }

  function setup() {
    var c = window.cxrConsole;
    var studyForm = $("dry-run-study");
    var fileForm = $("dry-run-file");
    if (!studyForm || !c) return;
    studyForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      handle(c.api("POST", studyForm.dataset.url, { study_uid: $("dry-run-uid").value.trim() }));
    });
    fileForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var headers = { Accept: "application/json" };
      headers[document.querySelector('meta[name="csrf-header"]').content] = c.csrfToken();
      handle(fetch(fileForm.dataset.url, {
        method: "POST",
        headers: headers,
        credentials: "same-origin",
        body: new FormData(fileForm),
      }));
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
