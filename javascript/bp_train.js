// BP Train tab: live progress polling and token-chip hover (WebUI and standalone app alike).
// The WebUI injects every javascript/*.js of an extension; the standalone app inlines the same file.
(function () {
    "use strict";

    function root() {
        // gradioApp() exists in the WebUI; the standalone page has no shadow root either.
        if (typeof gradioApp === "function") {
            try { return gradioApp(); } catch (e) { /* fall through */ }
        }
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function byId(id) {
        var r = root();
        return r.getElementById ? r.getElementById(id) : r.querySelector("#" + id);
    }

    function visible(el) {
        return !!el && el.offsetParent !== null && el.getClientRects().length > 0;
    }

    // ---- progress polling: click the Refresh button (#bp_train_poll) while the Train sub-tab is on screen,
    // every 1.5 s while a run is active, every 6 s otherwise (a run started elsewhere shows up too).
    var lastPoll = 0;
    var pollInFlightSince = 0;

    function runActive() {
        var p = byId("bp_train_progress");
        var box = p && p.querySelector(".bp-progress");
        var s = box && box.getAttribute("data-status");
        return s === "running" || s === "starting" || s === "stopping";
    }

    function tick() {
        var panel = byId("bp_train_train");
        var button = byId("bp_train_poll");
        if (!visible(panel) || !button || document.hidden) return;
        var now = Date.now();
        var every = runActive() ? 1500 : 6000;
        if (now - lastPoll < every) return;
        // Do not stack polls when the server is slow: wait for the last one (or 20 s).
        var log = byId("bp_train_progress");
        if (log && log.querySelector(".pending") && now - pollInFlightSince < 20000) return;
        lastPoll = now;
        pollInFlightSince = now;
        button.click();
    }

    // ---- the log follows its newest line unless the user scrolled up to read.
    var logStick = true;
    var logArea = null;

    function followLog() {
        var box = byId("bp_train_log");
        var area = box && box.querySelector("textarea");
        if (!area) return;
        if (area !== logArea) {
            logArea = area;
            area.addEventListener("scroll", function () {
                logStick = area.scrollHeight - area.scrollTop - area.clientHeight < 30;
            });
        }
        if (logStick) area.scrollTop = area.scrollHeight;
    }

    setInterval(function () { tick(); followLog(); }, 500);

    // ---- token chips: hovering a chip highlights every chip of the same token id.
    function chipHover(ev, on) {
        var chip = ev.target && ev.target.closest ? ev.target.closest(".bp-chip") : null;
        if (!chip) return;
        var id = chip.getAttribute("data-id");
        var box = chip.closest(".bp-tokens");
        if (!box || id === null) return;
        box.querySelectorAll('.bp-chip[data-id="' + id + '"]').forEach(function (c) {
            c.classList.toggle("bp-chip-same", on);
        });
    }

    document.addEventListener("mouseover", function (ev) { chipHover(ev, true); }, true);
    document.addEventListener("mouseout", function (ev) { chipHover(ev, false); }, true);

    // Exposed for tests and for other scripts.
    window.bpTrain = { tick: tick, runActive: runActive, root: root, followLog: followLog };
})();
