// The Conversation page: start a conversation (stored study or upload), ask questions and
// show each answer as it streams (fetch + ReadableStream reader over the Server-Sent Events
// body), stop an answer, summaries for the patient or the clinician, and "show me a CXR
// with ..." as an inline SYNTHETIC image. No inline script (CSP: 'self' only).
(function () {
  "use strict";

  var IMAGE_ASK = /^\s*show me (?:a |an )?(?:cxr|chest x-?ray|chest radiograph)\b\s*(?:with|of|showing)?\s*(.*)$/i;

  function $(id) { return document.getElementById(id); }

  var state = { id: null, demo: false, busy: false, base: "" };

  function c() { return window.cxrConsole; }

  function csrfHeaders(extra) {
    var h = extra || {};
    h[document.querySelector('meta[name="csrf-header"]').content] = c().csrfToken();
    return h;
  }

  function showError(text) {
    var e = $("chat-error");
    e.textContent = text;
    e.hidden = !text;
  }

  function showNotice(text) {
    var n = $("chat-notice");
    n.textContent = text;
    n.hidden = !text;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("chat-send").disabled = busy;
    $("chat-stop").disabled = !busy;
    $("chat-summary-patient").disabled = busy;
    $("chat-summary-clinician").disabled = busy;
  }

  function aiLabel(demo) {
    return c().el("span", { "class": "ai-label" }, "AI-generated" + (demo ? " · DEMO" : ""));
  }

  // one turn in the transcript: what was asked, and the element the answer goes into
  function addTurn(kind, asked) {
    var turn = c().el("div", { "class": "turn", "data-kind": kind, "data-state": "streaming" });
    turn.appendChild(c().el("p", { "class": "question" }, asked));
    var answer = c().el("p", { "class": "answer" });
    turn.appendChild(answer);
    turn.appendChild(aiLabel(state.demo));
    $("chat-transcript").appendChild(turn);
    turn.scrollIntoView({ block: "end" });
    return { turn: turn, answer: answer };
  }

  function finishTurn(t, stateName, done) {
    t.turn.setAttribute("data-state", stateName);
    if (done && done.turn_id) t.turn.setAttribute("data-turn-id", String(done.turn_id));
    if (done && done.stop_reason) t.turn.setAttribute("data-stop-reason", done.stop_reason);
    if (stateName === "cancelled") t.turn.appendChild(c().el("span", { "class": "muted" }, " (stopped)"));
    setBusy(false);
  }

  function started(conv) {
    state.id = conv.id;
    state.demo = !!conv.demo;
    $("chat-id").textContent = "#" + conv.id;
    $("chat-info").textContent = conv.source === "study"
      ? "Study " + conv.study_uid + ", image " + (conv.sop_instance_uid || "")
      : "Uploaded image (only its image codes are kept)";
    $("chat-session").hidden = false;
    $("chat-session").setAttribute("data-conversation-id", String(conv.id));
    var box = $("chat-transcript");
    while (box.firstChild) box.removeChild(box.firstChild);
    showError("");
    showNotice("");
    setBusy(false);
    $("chat-question").focus();
  }

  function startWith(promise) {
    showError("");
    promise.then(function (resp) {
      if (!resp.ok) return c().errorText(resp).then(function (t) { showError(t); $("chat-session").hidden = false; });
      return resp.json().then(started);
    }).catch(function () { showError("node unreachable"); });
  }

  // one Server-Sent Event block: "event: name" and "data: json" lines
  function parseBlock(block) {
    var name = null, data = "";
    block.split("\n").forEach(function (line) {
      if (line.indexOf("event: ") === 0) name = line.slice(7);
      else if (line.indexOf("data: ") === 0) data += line.slice(6);
    });
    if (!name) return null;
    try { return { name: name, data: JSON.parse(data || "{}") }; } catch (e) { return null; }
  }

  function stream(url, body, t) {
    setBusy(true);
    showError("");
    showNotice("");
    var ended = false;
    function onEvent(ev) {
      if (ev.name === "delta") {
        t.answer.textContent += ev.data.text;
      } else if (ev.name === "notice") {
        showNotice("Note: " + ev.data.message + ".");
      } else if (ev.name === "done") {
        ended = true;
        finishTurn(t, ev.data.stop_reason === "cancelled" ? "cancelled" : "done", ev.data);
      } else if (ev.name === "error") {
        ended = true;
        showError(ev.data.status + ": " + ev.data.detail);
        finishTurn(t, "error", null);
      }
    }
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: csrfHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
    }).then(function (resp) {
      if (!resp.ok) {
        return c().errorText(resp).then(function (text) { showError(text); finishTurn(t, "error", null); });
      }
      var reader = resp.body.getReader();
      var decoder = new TextDecoder();
      var buf = "";
      function pump() {
        return reader.read().then(function (r) {
          if (r.done) {
            if (!ended) finishTurn(t, "error", null);
            return;
          }
          buf += decoder.decode(r.value, { stream: true });
          var cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            var ev = parseBlock(buf.slice(0, cut));
            buf = buf.slice(cut + 2);
            if (ev) onEvent(ev);
          }
          return pump();
        });
      }
      return pump();
    }).catch(function () { showError("node unreachable"); finishTurn(t, "error", null); });
  }

  function syntheticFigure(url) {
    var fig = c().el("figure", { "class": "synthetic" });
    fig.appendChild(c().el("img", {
      src: url, width: "256", height: "256",
      alt: "SYNTHETIC chest X-ray generated by an AI model from the report",
    }));
    fig.appendChild(c().el("figcaption", { "class": "synthetic-label" },
      "SYNTHETIC image generated by an AI model — not a patient image."));
    return fig;
  }

  function showImage(report, asked) {
    var t = addTurn("image", asked);
    setBusy(true);
    c().api("POST", state.base + "/" + state.id + "/image", { report: report }).then(function (resp) {
      if (!resp.ok) return c().errorText(resp).then(function (text) { showError(text); finishTurn(t, "error", null); });
      return resp.json().then(function (turn) {
        t.answer.appendChild(syntheticFigure(turn.image_url));
        finishTurn(t, "done", { turn_id: turn.id, stop_reason: turn.stop_reason });
      });
    }).catch(function () { showError("node unreachable"); finishTurn(t, "error", null); });
  }

  // a reopened conversation: its stored turns, as they were shown when they were made
  function showStored(conv) {
    started(conv);
    conv.turns.forEach(function (turn) {
      var asked = turn.kind === "summary" ? "Summary for the " + turn.audience
        : turn.kind === "image" ? "show me a CXR with " + turn.question : turn.question;
      var t = addTurn(turn.kind, asked);
      if (turn.image_url) t.answer.appendChild(syntheticFigure(turn.image_url));
      else t.answer.textContent = turn.answer;
      finishTurn(t, turn.stop_reason === "cancelled" ? "cancelled" : "done",
        { turn_id: turn.id, stop_reason: turn.stop_reason });
    });
  }

  function reopen(id) {
    c().api("GET", state.base + "/" + id, null).then(function (resp) {
      if (!resp.ok) return c().errorText(resp).then(function (t) { showError(t); $("chat-session").hidden = false; });
      return resp.json().then(showStored);
    }).catch(function () { showError("node unreachable"); });
  }

  function ask(question) {
    var m = IMAGE_ASK.exec(question);
    if (m && m[1].trim()) return showImage(m[1].trim(), question);
    var t = addTurn("question", question);
    return stream(state.base + "/" + state.id + "/turns", { question: question }, t);
  }

  function summarize(audience) {
    var report = $("chat-report").value;
    var t = addTurn("summary", "Summary for the " + audience);
    var body = { audience: audience };
    if (report.trim()) body.report = report;
    return stream(state.base + "/" + state.id + "/summary", body, t);
  }

  function setup() {
    var app = $("chat-app");
    if (!app || !c()) return;
    state.base = app.getAttribute("data-api");
    state.demo = app.getAttribute("data-demo") === "true";
    if (app.getAttribute("data-reopen")) reopen(app.getAttribute("data-reopen"));
    $("chat-study-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      startWith(c().api("POST", state.base, { study_uid: $("chat-study").value }));
    });
    var upload = $("chat-upload-form");
    upload.addEventListener("submit", function (ev) {
      ev.preventDefault();
      startWith(fetch(state.base, {
        method: "POST",
        credentials: "same-origin",
        headers: csrfHeaders({ Accept: "application/json" }),
        body: new FormData(upload),
      }));
    });
    $("chat-ask-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var q = $("chat-question").value.trim();
      if (!q || state.busy || state.id === null) return;
      $("chat-question").value = "";
      ask(q);
    });
    $("chat-stop").addEventListener("click", function () {
      if (state.id === null) return;
      // the stream stays open: its "done" event says "cancelled" with the text so far
      c().api("POST", state.base + "/" + state.id + "/cancel", null);
    });
    ["chat-summary-patient", "chat-summary-clinician"].forEach(function (id) {
      $(id).addEventListener("click", function () {
        if (state.busy || state.id === null) return;
        summarize($(id).getAttribute("data-audience"));
      });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
