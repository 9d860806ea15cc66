// cxr-node web console: a little JavaScript, no build step, no external resources.
// Every state-changing request sends the CSRF token (double-submit: cookie + header).
"use strict";

(function () {
  function meta(name) {
    var m = document.querySelector('meta[name="' + name + '"]');
    return m ? m.getAttribute("content") : "";
  }

  function cookie(name) {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (parts[i].slice(0, eq) === name) return decodeURIComponent(parts[i].slice(eq + 1));
    }
    return "";
  }

  function csrfToken() {
    // the cookie is the truth (it may have been rotated since the page was rendered)
    return cookie(meta("csrf-cookie")) || meta("csrf-token");
  }

  // fetch JSON (or a blob) with the session cookie; POSTs carry the CSRF header
  function api(method, url, body, opts) {
    var headers = { Accept: (opts && opts.accept) || "application/json" };
    if (method !== "GET" && method !== "HEAD") headers[meta("csrf-header")] = csrfToken();
    if (body !== undefined && body !== null) headers["Content-Type"] = "application/json";
    return fetch(url, {
      method: method,
      headers: headers,
      credentials: "same-origin",
      body: body === undefined || body === null ? undefined : JSON.stringify(body),
    }).then(function (resp) {
      if (resp.status === 401 && !(opts && opts.noRedirect)) {
        window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
      }
      return resp;
    });
  }

  function errorText(resp) {
    return resp.text().then(function (t) {
      try {
        var j = JSON.parse(t);
        var d = j.detail !== undefined ? j.detail : j.error || j.message || t;
        return resp.status + ": " + (typeof d === "string" ? d : JSON.stringify(d));
      } catch (e) {
        return resp.status + ": " + (t || resp.statusText);
      }
    });
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  window.cxrConsole = { api: api, csrfToken: csrfToken, errorText: errorText, el: el };

  // --- every page: log out -------------------------------------------------------------
  function setupLogout() {
    var b = document.getElementById("logout");
    if (!b) return;
    b.addEventListener("click", function () {
      api("DELETE", "/api/session", null, { noRedirect: true }).finally(function () {
        window.location.assign("/login");
      });
    });
  }

  // --- login -------------------------------------------------------------------------------
  // where to go after the login: "next" as the browser resolves it (absolute), and only when
  // that is this node ("/\host" and "/<tab>/host" are "//host" to a browser); else the
  // queue. Never an open redirect.
  function sameOriginUrl(next) {
    if (!next || next.charAt(0) !== "/") return "/";
    var u;
    try {
      u = new URL(next, window.location.origin);
    } catch (e) {
      return "/";
    }
    return u.origin === window.location.origin ? u.href : "/";
  }

  function setupLogin() {
    var form = document.getElementById("login-form");
    if (!form) return;
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var out = document.getElementById("login-error");
      out.hidden = true;
      var token = document.getElementById("token").value.trim();
      fetch("/api/session", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ token: token }),
      }).then(function (resp) {
        if (resp.ok) {
          window.location.assign(sameOriginUrl(new URLSearchParams(window.location.search).get("next")));
          return;
        }
        errorText(resp).then(function (t) {
          out.textContent = "Login refused (" + t + ")";
          out.hidden = false;
        });
      });
    });
  }

  // --- queue -------------------------------------------------------------------------------
  function personName(pn) {
    // PS3.5 6.2: Family^Given^Middle^Prefix^Suffix (alphabetic group) -> "FAMILY, Given Middle"
    if (!pn) return "";
    var parts = String(pn).split("=")[0].split("^").map(function (p) { return p.trim(); });
    var rest = parts.slice(1, 4).filter(function (p) { return p; }).join(" ");
    return parts[0] && rest ? parts[0] + ", " + rest : parts[0] || rest;
  }

  function dicomDate(da) {
    return da && da.length === 8 ? da.slice(0, 4) + "-" + da.slice(4, 6) + "-" + da.slice(6) : da || "";
  }

  function duration(a, b) {
    if (!a || !b) return "";
    var s = (Date.parse(b) - Date.parse(a)) / 1000;
    if (!isFinite(s)) return "";
    if (Math.abs(s) < 120) return Math.round(s) + " s";
    if (Math.abs(s) < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  var picked = {};  // job ids ticked for a bulk action (kept across refreshes)

  function canOperate() {
    var role = document.body.getAttribute("data-role");
    return role === "operator" || role === "admin";
  }

  function jobRow(j) {
    var tr = el("tr", { "data-job-id": j.id, "data-state": j.state, "data-delivery": j.delivery_state || "none" });
    if (canOperate()) {
      var pick = el("td");
      var box = el("input", { type: "checkbox", class: "pick", value: j.id, "aria-label": "select job " + j.id });
      box.checked = !!picked[j.id];
      pick.appendChild(box);
      tr.appendChild(pick);
    }
    var td = el("td");
    td.appendChild(el("a", { href: "/jobs/" + encodeURIComponent(j.id) }, j.id));
    tr.appendChild(td);
    var pt = el("td", { class: "patient" });
    pt.appendChild(el("span", { class: "pn" }, personName(j.patient_name)));
    pt.appendChild(document.createTextNode(" "));
    pt.appendChild(el("span", { class: "muted pid" }, j.patient_id || ""));
    tr.appendChild(pt);
    tr.appendChild(el("td", null, j.accession_number || ""));
    tr.appendChild(el("td", null, dicomDate(j.study_date)));
    var study = el("td", { class: "study" }, j.study_description || "");
    study.appendChild(el("div", { class: "uid muted" }, j.study_uid));
    tr.appendChild(study);
    tr.appendChild(el("td", null, String(j.modalities || "").split("\\").join(", ")));
    tr.appendChild(el("td", null, j.calling_ae || ""));
    var st = el("td");
    var badge = el("span", { class: "badge state-" + j.state }, j.state);
    if (j.last_error) badge.setAttribute("title", j.last_error);  // e.g. why a study was skipped
    st.appendChild(badge);
    tr.appendChild(st);
    var dl = el("td");
    if (j.delivery_state && j.delivery_state !== "none") {
      dl.appendChild(el("span", { class: "badge delivery-" + j.delivery_state }, "delivery " + j.delivery_state));
    }
    tr.appendChild(dl);
    tr.appendChild(el("td", null, j.priority));
    tr.appendChild(el("td", null, j.attempts + "/" + j.max_attempts));
    var wait = duration(j.queued_at, j.started_at), run = duration(j.started_at, j.finished_at);
    tr.appendChild(el("td", { class: "timings" }, (wait ? "wait " + wait : "") + (run ? " · run " + run : "")));
    tr.appendChild(el("td", null, String(j.updated_at || "").replace("T", " ").slice(0, 19)));
    tr.appendChild(el("td", { class: "uid" }, j.sr_uid || j.sr_sop_instance_uid || ""));
    return tr;
  }

  function setupQueue() {
    var table = document.getElementById("jobs-table");
    if (!table) return;
    var body = document.getElementById("jobs-body");
    var filter = document.getElementById("state-filter");
    var stamp = document.getElementById("refreshed");
    var info = document.getElementById("page-info");
    function refresh() {
      // the server rendered this page's search, sort and page into data-api; the state
      // select changes without a reload
      var url = table.getAttribute("data-api");
      if (filter.value) url += (url.indexOf("?") < 0 ? "?" : "&") + "state=" + encodeURIComponent(filter.value);
      api("GET", url).then(function (resp) {
        if (!resp.ok) return;
        return resp.json().then(function (data) {
          var jobs = Array.isArray(data) ? data : data.jobs || data.items || [];
          body.replaceChildren.apply(body, jobs.map(jobRow));
          document.getElementById("jobs-empty").hidden = jobs.length > 0;
          if (info && typeof data.total === "number") {
            var first = data.total ? data.offset + 1 : 0;
            var pages = Math.max(1, Math.ceil(data.total / data.limit));
            info.textContent = first + "–" + (data.offset + jobs.length) + " of " + data.total +
              " · page " + (Math.floor(data.offset / data.limit) + 1) + " of " + pages;
          }
          stamp.textContent = "updated " + new Date().toLocaleTimeString();
        });
      }).catch(function () { stamp.textContent = "node unreachable"; });
      api("GET", "/ui/summary").then(function (resp) {
        if (!resp.ok) return;
        return resp.json().then(function (s) {
          var counts = s.counts || {};
          for (var k in counts) {
            var c = document.querySelector('.count[data-state="' + k + '"] b');
            if (c) c.textContent = counts[k];
          }
          updateModel(s.model || {});
        });
      }).catch(function () {});
    }
    body.addEventListener("change", function (ev) {
      var t = ev.target;
      if (t && t.classList && t.classList.contains("pick")) {
        if (t.checked) picked[t.value] = true; else delete picked[t.value];
      }
    });
    document.querySelectorAll("#jobs-body input.pick").forEach(function (b) { if (b.checked) picked[b.value] = true; });
    document.querySelectorAll("button.bulk").forEach(function (b) {
      b.addEventListener("click", function () {
        var ids = Object.keys(picked).map(Number);
        var out = document.getElementById("bulk-result");
        var action = b.getAttribute("data-action");
        if (!ids.length) { out.textContent = "select jobs first"; return; }
        if (!window.confirm(action + " " + ids.length + " job(s)?")) return;
        out.textContent = action + "…";
        api("POST", b.getAttribute("data-url"), { action: action, ids: ids }).then(function (resp) {
          if (!resp.ok) return errorText(resp).then(function (t) { out.textContent = action + " refused (" + t + ")"; });
          return resp.json().then(function (r) {
            var ok = r.results.filter(function (x) { return x.ok; }).length;
            var bad = r.results.filter(function (x) { return !x.ok; });
            out.textContent = action + ": " + ok + " done" + (bad.length ? ", " + bad.length + " refused (" +
              bad.map(function (x) { return x.job_id + ": " + x.error; }).join("; ") + ")" : "");
            picked = {};
            refresh();
          });
        });
      });
    });
    filter.addEventListener("change", function () {
      var u = new URL(window.location.href);
      if (filter.value) u.searchParams.set("state", filter.value); else u.searchParams.delete("state");
      window.history.replaceState(null, "", u.toString());
      refresh();
    });
    refresh();
    window.setInterval(refresh, 2000);
  }

  function updateModel(m) {
    var s = document.getElementById("model-state");
    if (s && m.state) {
      s.textContent = m.state;
      s.className = "badge model-" + m.state;
    }
    if (m.demo && !document.getElementById("demo-banner")) window.location.reload();
  }

  // POST body to url for button b, saying in out what happens: "what…", then "what: done"
  // and a reload of the page, or "what refused (error)" with the button enabled again
  function postThenReload(b, out, url, body, what, done) {
    b.disabled = true;
    out.textContent = what + "…";
    api("POST", url, body).then(function (resp) {
      if (resp.ok) {
        out.textContent = what + ": " + done;
        window.setTimeout(function () { window.location.reload(); }, 300);
      } else {
        errorText(resp).then(function (t) { out.textContent = what + " refused (" + t + ")"; b.disabled = false; });
      }
    });
  }

  // --- job detail: retry / cancel / re-send / withdraw ---------------------------------------------
  function setupJob() {
    var box = document.getElementById("actions");
    if (!box) return;
    var out = document.getElementById("action-result");
    box.querySelectorAll("button.action").forEach(function (b) {
      b.addEventListener("click", function () {
        var name = b.getAttribute("data-action");
        var body = {};
        if (name === "cancel" && !window.confirm("Cancel this job?")) return;
        if (name === "withdraw") {
          var reason = window.prompt("Withdraw the sent draft from every destination (and, if it is the study's current draft, the earlier drafts it superseded). Reason (sent to the receivers; no patient data):");
          if (!reason || !reason.trim()) return;
          body = { reason: reason.trim() };
        }
        postThenReload(b, out, b.getAttribute("data-url"), body, name, "done");
      });
    });
  }

  // --- job detail: a reviewer accepts, edits or rejects the draft ------------------------------
  function setupReview() {
    var box = document.getElementById("review");
    if (!box) return;
    var out = document.getElementById("review-result");
    box.querySelectorAll("button.review-action").forEach(function (b) {
      b.addEventListener("click", function () {
        var decision = b.getAttribute("data-decision");
        var body = { decision: decision };
        if (decision === "edit") body.text = document.getElementById("review-text").value;
        if (decision === "reject") {
          var reason = window.prompt("Reject the draft. Reason (no patient data):");
          if (!reason || !reason.trim()) return;
          body.reason = reason.trim();
        }
        postThenReload(b, out, box.getAttribute("data-url"), body, decision, "recorded");
      });
    });
  }

  // --- failures: re-send one delivery, or all of a destination's ------------------------
  function setupFailures() {
    var out = document.getElementById("resend-result");
    if (!out) return;
    function post(b, body, what) {
      b.disabled = true;
      out.textContent = what + "…";
      api("POST", b.getAttribute("data-url"), body).then(function (resp) {
        if (!resp.ok) return errorText(resp).then(function (t) { out.textContent = what + " refused (" + t + ")"; b.disabled = false; });
        return resp.json().then(function (r) {
          out.textContent = what + ": " + r.queued.length + " queued again";
          window.setTimeout(function () { window.location.reload(); }, 1500);
        });
      });
    }
    document.querySelectorAll("button.resend-delivery").forEach(function (b) {
      b.addEventListener("click", function () {
        post(b, { ids: [Number(b.getAttribute("data-id"))] }, "re-send");
      });
    });
    document.querySelectorAll("button.resend-destination").forEach(function (b) {
      b.addEventListener("click", function () {
        var d = b.getAttribute("data-destination");
        if (!window.confirm("Re-send all " + b.getAttribute("data-count") + " failed deliveries to " + d + "?")) return;
        post(b, { destination: d }, "re-send all");
      });
    });
  }

  // --- destinations: C-ECHO ----------------------------------------------------------------
  function setupDestinations() {
    document.querySelectorAll("button.echo").forEach(function (b) {
      var out = b.parentElement.querySelector(".echo-result");
      b.addEventListener("click", function () {
        b.disabled = true;
        out.textContent = "C-ECHO…";
        out.className = "echo-result";
        api("POST", b.getAttribute("data-url"), {}).then(function (resp) {
          b.disabled = false;
          if (!resp.ok) return errorText(resp).then(function (t) { out.textContent = t; out.className = "echo-result error"; });
          return resp.json().then(function (r) {
            out.textContent = r.ok ? "success" : "failed" + (r.error ? ": " + r.error : "");
            out.className = "echo-result " + (r.ok ? "ok" : "error");
          });
        });
      });
    });
  }

  // --- try: VQA and report -> CXR ----------------------------------------------------------
  function setupTry() {
    var vqa = document.getElementById("vqa-form");
    if (vqa) {
      vqa.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var out = document.getElementById("vqa-answer");
        out.textContent = "asking…";
        out.classList.remove("error");
        var uid = document.getElementById("vqa-study").value;
        var url = vqa.getAttribute("data-url").replace("{study_uid}", encodeURIComponent(uid));
        api("POST", url, { question: document.getElementById("vqa-question").value }).then(function (resp) {
          if (!resp.ok) return errorText(resp).then(function (t) { out.textContent = t; out.classList.add("error"); });
          return resp.json().then(function (a) { out.textContent = a.answer || a.text || ""; });
        });
      });
    }
    var gen = document.getElementById("gen-form");
    if (gen) {
      gen.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var err = document.getElementById("gen-error");
        var fig = document.getElementById("gen-figure");
        err.hidden = true;
        api("POST", gen.getAttribute("data-url"), { report: document.getElementById("gen-text").value },
            { accept: "image/png" }).then(function (resp) {
          if (!resp.ok) return errorText(resp).then(function (t) { err.textContent = t; err.hidden = false; });
          return resp.blob().then(function (blob) {
            var img = document.getElementById("gen-image");
            if (img.src && img.src.indexOf("blob:") === 0) URL.revokeObjectURL(img.src);
            img.src = URL.createObjectURL(blob);
            fig.hidden = false;
          });
        });
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupLogout();
    setupLogin();
    setupQueue();
    setupJob();
    setupReview();
    setupDestinations();
    setupFailures();
    setupTry();
  });
})();
