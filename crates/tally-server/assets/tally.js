/*! tally.js: counts video events from a web page. Served by tally at /v1/tally.js.
 *
 *   <script src="https://tally.example.com/v1/tally.js" data-key="tally_k…_…" async></script>
 *   <script>
 *     window.tally = window.tally || { q: [], track: function () { this.q.push(arguments); } };
 *     tally.track("video-123");                 // a view
 *     tally.track("video-123", "like");         // another event type
 *     tally.track("video-123", "watch_ms", 5400); // a value
 *   </script>
 *
 * Events of one page are batched (up to 100, or one second) and posted to the server the
 * script was loaded from with navigator.sendBeacon (fetch with keepalive where a beacon is
 * refused); what is queued is sent when the page is hidden or left. Each event carries an
 * event_id made here, so a batch delivered twice counts once. data-key is a write key
 * (bind it to the page's origins and video-id prefixes: `tally keys create --scope write
 * --origin … --video-prefix …`); it goes in the URL, as a beacon cannot set headers.
 */
(function () {
  "use strict";
  var BATCH_EVENTS = 100;
  var BATCH_DELAY_MS = 1000;
  // Browsers refuse beacons past 64 KiB in flight per page; larger batches use fetch.
  var BEACON_BYTES_MAX = 60000;

  var script = document.currentScript;
  var endpoint = new URL("/v1/events", script ? script.src : location.href);
  var key = script && script.getAttribute("data-key");
  if (key) endpoint.searchParams.set("key", key);
  endpoint = endpoint.href;
  var queue = [];
  var timer = null;

  function eventId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  function send(body) {
    if (navigator.sendBeacon && body.length <= BEACON_BYTES_MAX) {
      // A string goes as text/plain, which needs no CORS preflight.
      if (navigator.sendBeacon(endpoint, body)) return;
    }
    if (window.fetch) {
      fetch(endpoint, { method: "POST", body: body, keepalive: true, mode: "cors",
                        headers: { "content-type": "text/plain" } }).catch(function () {});
    }
  }

  function flush() {
    clearTimeout(timer);
    timer = null;
    while (queue.length) send(JSON.stringify(queue.splice(0, BATCH_EVENTS)));
  }

  function track(videoId, type, value) {
    var event = { video_id: String(videoId), type: type || "view", event_id: eventId() };
    if (value !== undefined) event.value = value;
    queue.push(event);
    if (queue.length >= BATCH_EVENTS) flush();
    else if (!timer) timer = setTimeout(flush, BATCH_DELAY_MS);
    return event.event_id;
  }

  var early = window.tally && window.tally.q;
  window.tally = { track: track, flush: flush };
  if (early) for (var i = 0; i < early.length; i++) track.apply(null, early[i]);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") flush();
  });
  window.addEventListener("pagehide", flush);
})();
