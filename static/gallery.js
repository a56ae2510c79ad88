// Keeps the gallery and trash pages in step with htmx: the image count, error messages,
// thumbnails whose presigned URLs expired while the page stayed open, and the viewer's
// keyboard. Every page works without it; this only saves reloads.
"use strict";

(function () {
  // How long a note that needs no action stays in the message area.
  const NOTE_SECONDS = 5;
  const MAX_MESSAGE_LENGTH = 200;
  let noteTimer = null;

  // The server renders the count with the page; on the trash page this keeps it current as
  // tiles come and go. The gallery page fetches its count and quota line again instead.
  function changeCount(delta) {
    const element = document.getElementById("count");
    if (!element) return;
    const count = Number(element.dataset.count) + delta;
    element.dataset.count = count;
    element.textContent = count + " " + (count === 1 ? element.dataset.noun : element.dataset.nouns);
    element.hidden = count === 0;
    document.getElementById("empty").hidden = count !== 0;
  }

  // `outage` marks an error from a 5xx response or from a request that got no response,
  // so that a later successful request clears it.
  function messageElement(text, className, outage) {
    const paragraph = document.createElement("p");
    paragraph.className = className;
    if (className === "error") paragraph.setAttribute("role", "alert");
    if (outage) paragraph.dataset.outage = "";
    paragraph.textContent = text;
    return paragraph;
  }

  function showMessage(text, className, outage) {
    clearTimeout(noteTimer);
    const messages = document.getElementById("messages");
    const paragraphs = text ? [messageElement(text, className || "error", outage)] : [];
    messages.replaceChildren(...paragraphs);
  }

  // Removes an error that came from a 5xx response or a network failure. upload.js calls
  // it when its own requests succeed, since they do not go through htmx.
  function clearOutage() {
    if (document.querySelector("#messages .error[data-outage]")) showMessage("");
  }

  function showNote(text) {
    showMessage(text, "note");
    noteTimer = setTimeout(() => showMessage(""), NOTE_SECONDS * 1000);
  }

  // A tile left the page because another tab or device deleted its image, so no response
  // of ours sent an event for it.
  function countTileGone() {
    if (document.getElementById("summary-refresh")) {
      htmx.trigger(document.body, "galleryChanged");
    } else {
      changeCount(-1);
    }
  }

  window.gallery = { showMessage, showNote, clearOutage };

  // A note that a response swaps into the message area with data-passing goes away like
  // one from showNote.
  document.addEventListener("htmx:oobAfterSwap", (event) => {
    const target = event.detail.target;
    if (target.id !== "messages" || !target.querySelector("[data-passing]")) return;
    clearTimeout(noteTimer);
    noteTimer = setTimeout(() => showMessage(""), NOTE_SECONDS * 1000);
  });

  // The app sends HX-Trigger: {"countChanged": delta} when a tile leaves the trash page.
  document.addEventListener("countChanged", (event) => changeCount(Number(event.detail.value)));

  // Statuses that a later request can fix: the app returns 503 while Redis or S3 is
  // unreachable, and a proxy in front of it may return 502 or 504 while the app restarts.
  // Status 0 is a request that got no response.
  const TEMPORARY_STATUSES = [0, 502, 503, 504];
  const FIRST_RETRY_SECONDS = 2;
  const MAX_RETRY_SECONDS = 30;
  // Failed polls in a row, by tile id, which set how long a tile waits before its next poll.
  const pollFailures = new Map();

  // A processing tile polls itself by replacing itself, so a failed poll would end its
  // polling. It polls again after 2 s, doubling up to 30 s, or after the Retry-After time.
  function retryTilePoll(detail) {
    const tile = detail.elt;
    if (!tile || !tile.isConnected || !tile.matches(".tile[hx-get]")) return;
    if (!TEMPORARY_STATUSES.includes(detail.xhr.status)) return;
    const failures = (pollFailures.get(tile.id) || 0) + 1;
    pollFailures.set(tile.id, failures);
    const retryAfter = Number(detail.xhr.getResponseHeader("Retry-After"));
    const backoff = Math.min(FIRST_RETRY_SECONDS * 2 ** (failures - 1), MAX_RETRY_SECONDS);
    const seconds = retryAfter > 0 ? retryAfter : backoff;
    setTimeout(() => {
      if (!tile.isConnected) return;
      // htmx.ajax rejects when no response arrives. The htmx:afterRequest listener has
      // already scheduled the next poll then.
      const options = { source: tile, target: tile, swap: "outerHTML" };
      htmx.ajax("GET", tile.dataset.tileUrl, options).catch(() => undefined);
    }, seconds * 1000);
  }

  document.addEventListener("htmx:afterRequest", (event) => {
    const detail = event.detail;
    if (!detail.successful) {
      retryTilePoll(detail);
      return;
    }
    if (detail.elt && detail.elt.id) pollFailures.delete(detail.elt.id);
    // A request the user started has succeeded, so an earlier error no longer applies.
    // Background requests, such as a processing tile polling itself, leave it in place,
    // unless the error came from an outage that the success shows is over.
    const trigger = detail.requestConfig.triggeringEvent;
    const messages = document.getElementById("messages");
    if (trigger && trigger.isTrusted && messages.querySelector(".error")) {
      showMessage("");
    } else {
      clearOutage();
    }
  });

  // The htmx-config in base.html swaps 4xx and 5xx bodies into the message area. Our app
  // returns plain text to htmx, so the text is wrapped here and never parsed as HTML.
  document.addEventListener("htmx:beforeSwap", (event) => {
    const detail = event.detail;
    if (!detail.isError) return;
    const tile = detail.requestConfig.elt.closest(".tile");
    // A delete, poll or refresh of a tile whose image another tab or device has deleted.
    if (detail.xhr.status === 404 && tile && tile.isConnected) {
      detail.shouldSwap = false;
      tile.remove();
      countTileGone();
      showNote("That image was already deleted.");
      return;
    }
    // Delete forever of an image that another tab or device has restored: the server kept
    // it, and its stale entry leaves the trash page while the message explains why.
    if (detail.xhr.status === 409 && tile && tile.dataset.state === "trashed") {
      tile.remove();
      countTileGone();
    }
    clearTimeout(noteTimer);
    const text = (detail.xhr.responseText || "").trim();
    const usable = text && text.length <= MAX_MESSAGE_LENGTH && !text.startsWith("<");
    const message = usable
      ? text
      : "The request failed (" + detail.xhr.status + "). Reload the page and try again.";
    const outage = detail.xhr.status >= 500;
    detail.serverResponse = messageElement(message, "error", outage).outerHTML;
  });

  // "Share selected" with no photo or too many selected stays on the page with a message.
  // Without JavaScript the server's page shows the same advice.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.id !== "share-form") return;
    const limit = Number(form.dataset.maxImages);
    const selected = document.querySelectorAll('input[form="share-form"]:checked').length;
    if (selected === 0) {
      showMessage("Select at least one photo, then choose “Share selected”.");
    } else if (selected > limit) {
      showMessage(`A link can hold at most ${limit} photos, and ${selected} are selected. Clear some of them.`);
    } else {
      return;
    }
    event.preventDefault();
  });

  // A network failure reaches no swap at all.
  document.addEventListener("htmx:sendError", () => {
    const text = "The gallery could not be reached. Check the connection, then try again.";
    showMessage(text, "error", true);
  });

  // Ids of the tiles refreshed after a thumbnail error, so each is refreshed at most once
  // per page view.
  const refreshedTiles = new Set();

  function refreshTile(image) {
    const tile = image.closest(".tile");
    if (!tile.dataset.tileUrl || refreshedTiles.has(tile.id)) return;
    refreshedTiles.add(tile.id);
    htmx.ajax("GET", tile.dataset.tileUrl, { target: tile, swap: "outerHTML" });
  }

  // A thumbnail that fails to load, most likely because its presigned URL expired while the
  // page stayed open, gets its tile fetched again with fresh URLs. Image errors do not
  // bubble, so the listener runs in the capture phase.
  document.addEventListener(
    "error",
    (event) => {
      const image = event.target;
      if (image instanceof HTMLImageElement && image.matches(".tile img.thumbnail")) {
        refreshTile(image);
      }
    },
    true,
  );

  // A thumbnail can fail before this deferred script runs, and then no error event is left.
  document.addEventListener("DOMContentLoaded", () => {
    for (const image of document.querySelectorAll(".tile img.thumbnail")) {
      if (image.complete && image.naturalWidth === 0 && image.currentSrc) refreshTile(image);
    }
  });

  // The viewer: the overlay opened from a tile, or the page opened by its URL.

  function viewerFrame() {
    return document.getElementById("viewer-frame");
  }

  // While the overlay is open, everything around it is inert: Tab and screen readers stay
  // in the dialog, as with a modal <dialog>. The message area stays live, for its notes.
  function setViewing(viewing) {
    document.body.classList.toggle("viewing", viewing);
    const main = document.getElementById("main");
    for (const element of [...document.body.children, ...main.children]) {
      if (element === main || element.id === "viewer" || element.id === "messages") continue;
      element.inert = viewing;
    }
  }

  function closeOverlay() {
    const frame = viewerFrame();
    if (!frame || !frame.classList.contains("overlay")) return false;
    frame.remove();
    setViewing(false);
    history.pushState({}, "", frame.querySelector(".viewer-close").href);
    // Focus goes to the tile of the image last shown, so the keyboard user keeps their place.
    const link = document.querySelector("#tile-" + frame.dataset.imageId + " a.frame");
    if (link) link.focus();
    return true;
  }

  document.addEventListener("htmx:afterSwap", (event) => {
    const frame = viewerFrame();
    const target = event.detail.target;
    if (!target || target.id !== "viewer" || !frame) return;
    setViewing(frame.classList.contains("overlay"));
    frame.focus();
  });

  document.addEventListener("click", (event) => {
    const close = event.target.closest(".overlay .viewer-close");
    if (close && closeOverlay()) event.preventDefault();
  });

  // Back and Forward keep the page in step with the URL. htmx loads the entries it pushed
  // from the server. For other entries, leaving a viewer URL closes the overlay, and any
  // other mismatch between the URL and the page reloads the page.
  window.addEventListener("popstate", (event) => {
    if (event.state && event.state.htmx) return;
    const frame = viewerFrame();
    const atViewer = location.pathname.endsWith("/view");
    if (frame && frame.classList.contains("overlay") && !atViewer) {
      frame.remove();
      setViewing(false);
    } else if (atViewer !== Boolean(frame)) {
      location.reload();
    }
  });

  const VIEWER_KEYS = { ArrowLeft: ".viewer-prev", ArrowRight: ".viewer-next" };

  document.addEventListener("keydown", (event) => {
    const frame = viewerFrame();
    if (!frame || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.target.closest("input, textarea, select")) return;
    if (event.key === "Escape") {
      event.preventDefault();
      if (!closeOverlay()) frame.querySelector(".viewer-close").click();
      return;
    }
    const selector = VIEWER_KEYS[event.key];
    const link = selector && frame.querySelector("a" + selector);
    if (!link) return;
    event.preventDefault();
    // Requested here rather than by clicking the link, because htmx takes over a swapped-in
    // link only after settling, and a click before that would load the whole page.
    const headers = frame.classList.contains("overlay") ? { "X-Viewer": "overlay" } : {};
    htmx.ajax("GET", link.href, { source: link, target: "#viewer", swap: "innerHTML", headers, push: link.href });
  });
})();
