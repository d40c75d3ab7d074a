/* The fleet page: polls /console/state and redraws; admins get action buttons.
   Every value from the server is written with textContent (never as HTML). */
(function () {
  "use strict";
  var meta = function (name) {
    var el = document.querySelector('meta[name="' + name + '"]');
    return el ? el.getAttribute("content") : "";
  };
  var CSRF = meta("csrf-token");
  var POLL_MS = parseInt(meta("console-poll-ms"), 10) || 2000;
  var ADMIN = meta("console-admin") === "1";
  var lastOk = 0;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 90) return seconds + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    if (seconds < 172800) return Math.round(seconds / 3600) + " h";
    return Math.round(seconds / 86400) + " d";
  }

  function clock(iso) {
    if (!iso) return "–";
    var d = new Date(iso);
    return d.toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  function short(iso) {
    if (!iso) return "never";
    return new Date(iso).toISOString().slice(11, 19) + "Z";
  }

  function badge(text, kind) {
    return el("span", {"class": "badge " + (kind || ""), text: text});
  }

  function notice(text, bad) {
    var box = document.getElementById("notice");
    box.textContent = text;
    box.className = "notice" + (bad ? " bad" : "");
    box.hidden = !text;
  }

  function act(method, url, body, label) {
    var opts = {method: method, credentials: "same-origin",
                headers: {"X-CSRF-Token": CSRF, "Accept": "application/json"}};
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(url, opts).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (data) {
        if (!resp.ok) {
          var msg = (data.error && data.error.message) || ("HTTP " + resp.status);
          notice(label + " failed: " + msg, true);
        } else {
          notice(label + ": done", false);
        }
        return refresh();
      });
    }).catch(function (err) { notice(label + " failed: " + err, true); });
  }

  function button(text, cls, onclick, testid) {
    var b = el("button", {"type": "button", "class": cls || "", text: text});
    if (testid) b.setAttribute("data-action", testid);
    b.addEventListener("click", onclick);
    return b;
  }

  function enc(s) { return encodeURIComponent(s); }

  function nodeCard(n) {
    var state = n.alive ? badge("alive", "ok") : badge("silent", "bad");
    var marks = [state];
    if (n.draining) marks.push(badge("draining", "warn"));
    else if (n.cordoned) marks.push(badge("cordoned", "warn"));
    var actions = null;
    if (ADMIN) {
      var a = [];
      if (n.cordoned) a.push(button("Uncordon", "", function () {
        act("POST", "/admin/nodes/" + enc(n.name) + "/uncordon", undefined, "Uncordon " + n.name);
      }, "uncordon-node"));
      else a.push(button("Cordon", "", function () {
        act("POST", "/admin/nodes/" + enc(n.name) + "/cordon", undefined, "Cordon " + n.name);
      }, "cordon-node"));
      // a drain preempts every holder (notice, then preempted): ask, as Forget does
      if (!n.draining) a.push(button("Drain", "", function () {
        if (window.confirm("Drain " + n.name + "? Every allocation on it is preempted: its " +
                           "holder gets notice to leave, and the node stays cordoned.")) {
          act("POST", "/admin/nodes/" + enc(n.name) + "/drain", undefined, "Drain " + n.name);
        }
      }, "drain-node"));
      if (!n.alive) a.push(button("Forget", "danger", function () {
        if (window.confirm("Forget " + n.name + "? Its allocations end as lost.")) {
          act("DELETE", "/admin/nodes/" + enc(n.name), undefined, "Forget " + n.name);
        }
      }, "forget-node"));
      actions = el("div", {"class": "actions"}, a);
    }
    var head = el("div", {"class": "node-head"}, [
      el("h3", {text: n.name}),
      el("span", {"class": "marks"}, marks),
      el("span", {"class": "muted", text: "heartbeat " + ago(n.heartbeat_age_seconds) + " ago" +
        (n.backend ? " · " + n.backend : "") + (n.host ? " · " + n.host : "")}),
      actions
    ]);
    var rows = n.gpus.map(function (g) { return gpuRow(n, g); });
    var table = el("table", {"class": "grid gpus"}, [
      el("thead", {}, [el("tr", {}, ["GPU", "Model", "Memory", "Util", "Temp", "Health", "Held by", ADMIN ? "" : null]
        .filter(function (h) { return h !== null; }).map(function (h) {
          var cls = {"Model": "col-model", "Temp": "col-temp"}[h];
          return el("th", cls ? {"class": cls, text: h} : {text: h});
        }))]),
      el("tbody", {}, rows)
    ]);
    return el("article", {"class": "node card" + (n.alive ? "" : " dead"), "data-node": n.name},
              [head, el("div", {"class": "scroll"}, [table])]);
  }

  function gpuRow(n, g) {
    var used = g.memory_used_mb || 0, total = g.memory_total_mb || 0;
    var pct = total ? Math.round(100 * used / total) : 0;
    var fill = el("span");
    fill.style.width = pct + "%";  // CSSOM, which the page's CSP allows (a style attribute it would not)
    var mem = el("div", {"class": "mem"}, [
      el("div", {"class": "bar"}, [fill]),
      el("span", {text: Math.round(used / 1024) + " / " + Math.round(total / 1024) + " GB"})
    ]);
    var health = g.lost ? badge("lost", "bad") : badge(g.health || "?", g.health === "ok" ? "ok" : "bad");
    var healthCell = el("td", {}, [health, g.cordoned ? badge("cordoned", "warn") : null]);
    var held;
    if (g.holders && g.holders.length) {
      held = el("td", {"class": "holder"}, g.holders.map(function (h) {
        return el("div", {"class": "who-holds", "data-request": h.request_id}, [
          el("strong", {text: h.service_name || "?"}),
          h.owner ? el("span", {"class": "muted", text: " (" + h.owner + ")"}) : null,
          el("div", {"class": "muted small", text: "since " + short(h.since) + " · lease ends " + short(h.expires_at) +
            (h.sharing === "shared" ? " · shared" : "")}),
          h.status === "preempting" ? badge("preempting until " + clock(h.preempt_at), "warn") : null
        ]);
      }));
    } else {
      held = el("td", {"class": "holder muted", text: "free"});
    }
    var cells = [
      el("td", {text: String(g.index)}),
      el("td", {"class": "col-model", text: g.name || "?"}),
      el("td", {}, [mem]),
      el("td", {text: Math.round(g.utilization || 0) + "%"}),
      el("td", {"class": "col-temp", text: Math.round(g.temperature || 0) + "°C"}),
      healthCell, held
    ];
    if (ADMIN) {
      var path = "/admin/gpus/" + enc(n.name) + "/" + g.index;
      cells.push(el("td", {}, [g.cordoned ?
        button("Uncordon", "small", function () { act("POST", path + "/uncordon", undefined, "Uncordon GPU " + g.index); }, "uncordon-gpu") :
        button("Cordon", "small", function () { act("POST", path + "/cordon", undefined, "Cordon GPU " + g.index); }, "cordon-gpu")]));
    }
    return el("tr", {"data-gpu": n.name + "/" + g.index}, cells);
  }

  function queueRow(q) {
    var prio = el("td", {text: String(q.priority)});
    if (ADMIN) {
      var input = el("input", {"type": "number", "min": "1", "max": "10", "value": String(q.priority),
                               "aria-label": "priority of " + q.request_id, "class": "prio"});
      prio = el("td", {}, [input, button("Set", "small", function () {
        act("POST", "/admin/requests/" + enc(q.request_id) + "/priority",
            {priority: parseInt(input.value, 10)}, "Priority of " + q.request_id);
      }, "set-priority")]);
    }
    return el("tr", {"data-request": q.request_id}, [
      el("td", {text: String(q.position)}),
      el("td", {"class": "mono", text: q.request_id}),
      el("td", {text: q.service_name || ""}),
      el("td", {text: q.owner || "–"}),
      el("td", {text: q.required_gpus + (q.min_memory_mb ? " × " + Math.round(q.min_memory_mb / 1024) + " GB" : "")}),
      prio,
      el("td", {text: ago(q.waiting_seconds)}),
      el("td", {"class": "reason", text: q.reason || "", title: REASONS[q.reason] || ""}),
      el("td", {text: q.eta ? clock(q.eta) : "unknown"})
    ]);
  }

  // the server's reason (app/waiting.py), explained on hover
  var REASONS = {
    capacity: "no GPUs free that fit it",
    quota: "its tenant holds its max_gpus",
    dependency: "waits for a depends_on request to finish",
    reservation: "GPUs that fit are held back for a request ahead of it",
    priority: "it fits, but another request goes first"
  };

  function eventItem(e) {
    var parts = [];
    ["service_name", "request_id", "node", "gpu_index", "health", "priority", "reason", "allocations_lost", "for"].forEach(function (k) {
      if (e[k] !== undefined) parts.push(k.replace("_", " ") + " " + e[k]);
    });
    if (e.preempt_at) parts.push("ends " + clock(e.preempt_at));
    if (e.by) parts.push("by " + e.by);
    return el("li", {"data-event": e.event}, [
      el("span", {"class": "muted mono", text: short(e.at)}), " ",
      el("strong", {text: e.event}), " ",
      el("span", {text: parts.join(" · ")})
    ]);
  }

  function summary(c) {
    var box = document.getElementById("summary");
    box.textContent = "";
    [["GPUs free", c.gpus_available + " / " + c.gpus_total],
     ["allocations", String(c.allocations_active)],
     ["queued", String(c.queue_depth)],
     ["nodes alive", c.nodes_alive + " / " + c.nodes_total]].forEach(function (p) {
      box.appendChild(el("span", {"class": "stat"}, [el("b", {text: p[1]}), " " + p[0]]));
    });
  }

  function draw(state) {
    summary(state.counts);
    var nodes = document.getElementById("nodes");
    nodes.textContent = "";
    if (!state.nodes.length) nodes.appendChild(el("p", {"class": "muted", text: "No node has reported yet."}));
    state.nodes.forEach(function (n) { nodes.appendChild(nodeCard(n)); });
    var tbody = document.querySelector("#queue tbody");
    // keep a priority being typed: skip redrawing the queue while one of its inputs has focus
    // (an input only: a Set button keeps the focus after its click, and nothing is typed there)
    var typing = document.activeElement;
    if (!(typing && typing.tagName === "INPUT" && tbody.contains(typing))) {
      tbody.textContent = "";
      if (!state.queue.length) tbody.appendChild(el("tr", {}, [el("td", {"colspan": "9", "class": "muted", text: "Nothing waits."})]));
      state.queue.forEach(function (q) { tbody.appendChild(queueRow(q)); });
    }
    var events = document.getElementById("events");
    events.textContent = "";
    state.events.forEach(function (e) { events.appendChild(eventItem(e)); });
    document.getElementById("stamp").textContent = "updated " + clock(state.now);
  }

  function refresh() {
    return fetch("/console/state", {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (resp) {
        if (resp.status === 401) { window.location.href = "/login?next=/"; return null; }
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        return resp.json();
      })
      .then(function (state) {
        if (!state) return;
        lastOk = Date.now();
        draw(state);
        document.body.classList.remove("stale");
      })
      .catch(function (err) {
        document.body.classList.add("stale");
        document.getElementById("stamp").textContent = "not updating (" + err.message + ")";
      });
  }

  function loop() {
    refresh().then(function () { window.setTimeout(loop, POLL_MS); });
  }

  document.addEventListener("DOMContentLoaded", loop);
})();
