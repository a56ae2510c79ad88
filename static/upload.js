// Uploads each chosen file straight to S3 with a presigned POST form, then reports it done.
// The request to S3 is a plain XMLHttpRequest: htmx headers on it would trigger CORS
// preflights, and XMLHttpRequest reports upload progress.
// It also keeps the grid in step: the image count, tiles deleted in another tab, and
// thumbnails whose presigned URLs expired while the page stayed open.
"use strict";

(function () {
  const MAX_PARALLEL_UPLOADS = 3;
  // The maximum number of form requests for one file while the server returns
  // 429 Too Many Requests.
  const MAX_FORM_ATTEMPTS = 30;
  // How long a note that needs no action stays in the message area.
  const NOTE_SECONDS = 5;
  const queue = [];
  let running = 0;
  let noteTimer = null;

  // Raised when the app returns 401 Unauthorized because the session ended, by sign-out in
  // another tab or by expiry.
  class SignedOutError extends Error {
    constructor(signinUrl) {
      super("signed out: sign in again");
      this.signinUrl = signinUrl;
    }
  }

  function csrfToken() {
    return JSON.parse(document.body.getAttribute("hx-headers"))["x-csrftoken"];
  }

  function addRow(file) {
    const row = document.createElement("li");
    row.className = "upload-row";
    const name = document.createElement("span");
    name.className = "upload-name";
    name.textContent = file.name;
    name.title = file.name;
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = 0;
    const state = document.createElement("span");
    state.className = "upload-state";
    state.textContent = "waiting";
    row.append(name, bar, state);
    document.getElementById("upload-list").append(row);
    return { row, bar, state };
  }

  // The server renders the count with the page, and this keeps it in step as tiles come and go.
  function changeCount(delta) {
    const element = document.getElementById("count");
    const count = Number(element.dataset.count) + delta;
    element.dataset.count = count;
    element.textContent = count + (count === 1 ? " image" : " images");
    element.hidden = count === 0;
    document.getElementById("empty").hidden = count !== 0;
  }

  function setState(view, text, kind) {
    view.state.textContent = text;
    view.row.dataset.state = kind;
  }

  // Browsers leave the type of some photo formats empty, so it is taken from the name.
  const TYPES_BY_EXTENSION = {
    heic: "image/heic",
    heif: "image/heif",
    tif: "image/tiff",
    tiff: "image/tiff",
  };

  function contentType(file) {
    if (file.type) return file.type;
    const extension = file.name.split(".").pop().toLowerCase();
    return TYPES_BY_EXTENSION[extension] || "";
  }

  // Checks what the signed form would reject anyway, so the user learns it before uploading.
  function problemWith(file, uploader) {
    const allowed = uploader.dataset.allowedTypes.split(",");
    const maxBytes = Number(uploader.dataset.maxBytes);
    if (!allowed.includes(contentType(file))) {
      return "rejected: only JPEG, PNG, WebP, GIF, HEIC and TIFF images can be uploaded";
    }
    if (file.size === 0) {
      return "rejected: the file is empty";
    }
    if (file.size > maxBytes) {
      const limitMiB = Number((maxBytes / 1048576).toFixed(1));
      return "rejected: larger than the " + limitMiB + " MiB limit";
    }
    return null;
  }

  function signedOut(response, uploader) {
    return new SignedOutError(response.headers.get("HX-Redirect") || uploader.dataset.signinUrl);
  }

  // Returns the parsed body, or null when it is not JSON, such as a sign-in page.
  async function readJson(response) {
    const type = response.headers.get("Content-Type") || "";
    if (!type.startsWith("application/json")) return null;
    return response.json().catch(() => null);
  }

  function sleep(seconds) {
    return new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }

  // Requests a signed form from the app. While too many uploads are pending, it waits for the
  // Retry-After time and requests again.
  // With HX-Request, the app returns 401 for a missing session instead of a redirect that
  // fetch would follow to the sign-in page. Accept keeps the app's error bodies JSON.
  async function requestForm(file, uploader, view) {
    for (let attempt = 1; ; attempt += 1) {
      const response = await fetch(uploader.dataset.createUrl, {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Accept: "application/json",
          "HX-Request": "true",
          "x-csrftoken": csrfToken(),
        },
        body: JSON.stringify({
          filename: file.name,
          content_type: contentType(file),
          size: file.size,
        }),
        credentials: "same-origin",
      });
      if (response.status === 401) {
        throw signedOut(response, uploader);
      }
      const body = await readJson(response);
      if (response.ok) {
        if (body === null) throw new Error("the server returned an unexpected response");
        return body;
      }
      const message =
        (body && (body.error || body.detail)) || "the server returned status " + response.status;
      if (response.status !== 429 || attempt >= MAX_FORM_ATTEMPTS) {
        throw new Error(message);
      }
      setState(view, "waiting for earlier uploads to be checked", "waiting");
      await sleep(Number(response.headers.get("Retry-After")) || 5);
      setState(view, "uploading", "uploading");
    }
  }

  // Reports the upload done and puts the tile the app returns at the top of the grid.
  async function completeUpload(form, uploader) {
    const response = await fetch(form.complete_url, {
      method: "POST",
      headers: { "x-csrftoken": csrfToken(), "HX-Request": "true" },
      credentials: "same-origin",
    });
    if (response.status === 401) {
      throw signedOut(response, uploader);
    }
    const text = await response.text();
    if (!response.ok) {
      throw new Error(text.length > 0 && text.length < 200 ? text : "the server returned status " + response.status);
    }
    htmx.swap("#grid", text, { swapStyle: "afterbegin" });
    changeCount(1);
  }

  function postToS3(form, file, view) {
    return new Promise((resolve, reject) => {
      const data = new FormData();
      for (const [name, value] of Object.entries(form.fields)) {
        data.append(name, value);
      }
      // S3 ignores every field after the file, so the file goes last.
      data.append("file", file);
      const request = new XMLHttpRequest();
      request.open("POST", form.url);
      request.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) {
          view.bar.value = Math.round((100 * event.loaded) / event.total);
        }
      });
      request.addEventListener("load", () => {
        if (request.status === 201 || request.status === 204) {
          resolve();
        } else {
          reject(new Error("storage rejected the file (" + request.status + ")"));
        }
      });
      request.addEventListener("error", () => reject(new Error("network error")));
      request.send(data);
    });
  }

  async function upload(file, view, uploader) {
    setState(view, "uploading", "uploading");
    try {
      const form = await requestForm(file, uploader, view);
      await postToS3(form, file, view);
      view.bar.value = 100;
      setState(view, "verifying", "verifying");
      await completeUpload(form, uploader);
      setState(view, "uploaded", "done");
    } catch (error) {
      if (error instanceof SignedOutError) {
        stopUploads(error, view);
        return;
      }
      setState(view, "failed: " + error.message, "failed");
    }
  }

  // Marks the queued uploads too, since none can succeed, and opens the sign-in page.
  function stopUploads(error, view) {
    const queued = queue.splice(0).map((item) => item.view);
    for (const stopped of [view, ...queued]) {
      setState(stopped, error.message, "failed");
    }
    window.location.assign(error.signinUrl);
  }

  function pump(uploader) {
    while (running < MAX_PARALLEL_UPLOADS && queue.length > 0) {
      const { file, view } = queue.shift();
      running += 1;
      upload(file, view, uploader).finally(() => {
        running -= 1;
        pump(uploader);
      });
    }
  }

  function addFiles(files, uploader) {
    for (const file of files) {
      const view = addRow(file);
      const problem = problemWith(file, uploader);
      if (problem) {
        setState(view, problem, "failed");
        continue;
      }
      queue.push({ file, view });
    }
    pump(uploader);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const uploader = document.getElementById("uploader");
    if (!uploader) return;
    const input = document.getElementById("file-input");
    input.addEventListener("change", () => {
      addFiles(Array.from(input.files), uploader);
      input.value = "";
    });
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      addFiles(Array.from(event.dataTransfer.files), uploader);
    });
  });

  function showMessage(text) {
    clearTimeout(noteTimer);
    document.getElementById("messages").textContent = text;
  }

  function showNote(text) {
    showMessage(text);
    noteTimer = setTimeout(() => showMessage(""), NOTE_SECONDS * 1000);
  }

  document.addEventListener("htmx:afterRequest", (event) => {
    if (!event.detail.successful) return;
    // Counts a tile that a delete button removed.
    if (event.detail.requestConfig.verb.toLowerCase() === "delete") {
      changeCount(-1);
    }
    // A request the user started has succeeded, so an earlier error no longer applies.
    // Background requests, such as a processing tile polling itself, leave it in place.
    const trigger = event.detail.requestConfig.triggeringEvent;
    if (trigger && trigger.isTrusted) {
      showMessage("");
    }
  });

  // htmx drops error bodies by default; show them in the message area instead.
  document.addEventListener("htmx:responseError", (event) => {
    const { xhr, target } = event.detail;
    const tile = target && target.closest(".tile");
    // A delete, poll or refresh of a tile whose image another tab or device has deleted.
    if (xhr.status === 404 && tile) {
      tile.remove();
      changeCount(-1);
      showNote("That image was already deleted.");
      return;
    }
    const text = xhr.responseText || "The request failed.";
    showMessage(text.length > 200 ? "The request failed." : text);
  });

  // Ids of the tiles refreshed after a thumbnail error, so each is refreshed at most once
  // per page view.
  const refreshedTiles = new Set();

  // A thumbnail that fails to load, most likely because its presigned URL expired while the
  // page stayed open, gets its tile fetched again with fresh URLs. Image errors do not
  // bubble, so the listener runs in the capture phase.
  document.addEventListener(
    "error",
    (event) => {
      const image = event.target;
      if (!(image instanceof HTMLImageElement) || !image.matches(".tile img.thumbnail")) return;
      const tile = image.closest(".tile");
      if (!tile.dataset.tileUrl || refreshedTiles.has(tile.id)) return;
      refreshedTiles.add(tile.id);
      htmx.ajax("GET", tile.dataset.tileUrl, { target: tile, swap: "outerHTML" });
    },
    true,
  );
})();
