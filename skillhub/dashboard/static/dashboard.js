// skillhub dashboard. The token is asked for once and kept in this tab's sessionStorage; it only ever leaves the
// page as an Authorization header to this same origin's API (never in a URL, a cookie or the page). Without it the
// page shows what /healthz shows. Panels are rendered by the server (escaped) from the same views as the JSON API.
"use strict";
(function () {
  const KEY = "skillhub-token";
  const POLL_MS = 2000;        // /readyz: a new version re-renders the panels
  const REFRESH_EVERY = 5;     // and every 5th poll anyway (inbox, localizing skills)
  let shown = null, ticks = 0, timer = null;
  const $ = (id) => document.getElementById(id);

  function token() { return sessionStorage.getItem(KEY); }

  function say(text, error) {
    const m = $("message");
    m.textContent = text;
    m.classList.toggle("error", !!error);
  }

  function signedOut(why) {
    sessionStorage.removeItem(KEY);
    if (timer) { clearTimeout(timer); timer = null; }
    shown = null;
    $("panels").replaceChildren();
    $("login").hidden = false;
    $("logout").hidden = true;
    $("version").textContent = "not signed in";
    $("updated").textContent = "";
    if (why) say(why, true);
  }

  async function api(method, path, body) {
    const headers = { "Authorization": "Bearer " + token() };
    const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const r = await fetch(path, init);
    if (r.status === 401) { signedOut("The service refused this token."); throw new Error("unauthorized"); }
    return r;
  }

  async function refresh() {
    const r = await api("GET", "/v1/dashboard");
    if (!r.ok) { say("The service answered " + r.status + " for the panels.", true); return; }
    // server-rendered with every value escaped (Jinja2 autoescape); a template, not data, decides the markup
    const tpl = document.createElement("template");
    tpl.innerHTML = await r.text();
    $("panels").replaceChildren(tpl.content);
    const v = r.headers.get("x-skillhub-version");
    shown = v === null || v === "" ? null : Number(v);
    $("version").textContent = shown === null ? "no version yet" : "version " + shown;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  async function poll() {
    timer = null;
    if (!token()) return;
    try {
      const r = await api("GET", "/readyz");
      const ready = await r.json();
      const version = ready.version === undefined ? null : ready.version;
      if (version !== shown || ++ticks % REFRESH_EVERY === 0) await refresh();
    } catch (e) {
      if (!token()) return;
      say("The service is not answering (" + e.message + "); retrying.", true);
    }
    if (token()) timer = setTimeout(poll, POLL_MS);
  }

  async function start() {
    $("login").hidden = true;
    $("logout").hidden = false;
    say("Signed in for this tab; the page follows new versions by itself.");
    try { await refresh(); } catch (e) { if (!token()) return; say("Could not load the panels: " + e.message, true); }
    if (token() && !timer) timer = setTimeout(poll, POLL_MS);
  }

  async function act(button) {
    const name = button.dataset.skill, action = button.dataset.action;
    const path = "/v1/skills/" + encodeURIComponent(name);
    let r;
    if (action === "remove") {
      if (!confirm("Remove skill " + name + " and all its versions?")) return;
      r = await api("DELETE", path);
    } else if (action === "pin") {
      const select = Array.from(document.querySelectorAll("select[data-pin-for]"))
        .find((s) => s.dataset.pinFor === name);
      const value = select ? select.value : "";
      r = await api("POST", path + "/pin", { version: value === "" ? null : Number(value) });
    } else if (action === "enable" || action === "disable") {
      r = await api("POST", path + "/" + action);
    } else {
      return;
    }
    let answer = {};
    try { answer = await r.json(); } catch (e) { /* not JSON: the status says enough */ }
    say(r.ok ? action + " " + name + ": done; a new version follows when the served set changes"
             : action + " " + name + " failed: " + (answer.error || r.status), !r.ok);
    await refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      start();
    });
    $("logout").addEventListener("click", () => { signedOut(""); say("Token forgotten."); });
    $("panels").addEventListener("click", (ev) => {
      const button = ev.target.closest("button[data-action]");
      if (button) act(button).catch((e) => say("Failed: " + e.message, true));
    });
    if (token()) start();
  });
})();
