// Uploads each chosen or dropped file straight to S3 with a presigned POST form, then
// reports it done and follows its tile until the worker has checked it.
// The request to S3 is a plain XMLHttpRequest: htmx headers on it would trigger CORS
// preflights, and XMLHttpRequest reports upload progress.
"use strict";

(function () {
  // The maximum number of form requests for one file while the server returns
  // 429 Too Many Requests.
  const MAX_FORM_ATTEMPTS = 30;
  const queue = [];
  // Rows of uploads reported done, by upload id, until their tile is ready or rejected.
  const followed = new Map();
  let running = 0;
  const UNREACHABLE = "the gallery could not be reached. Check the connection, then choose Retry.";

  // Raised when the app returns 401 Unauthorized because the session ended, by sign-out in
  // another tab or by expiry.
  class SignedOutError extends Error {
    constructor(signinUrl) {
      super("signed out: sign in again");
      this.signinUrl = signinUrl;
    }
  }

  // Raised when the user cancels an upload.
  class CancelledError extends Error {
    constructor() {
      super("cancelled");
    }
  }

  // Raised when the app fails in a way that a later attempt can fix: a 5xx response, such
  // as 503 while Redis or S3 is unreachable, or no response at all.
  class TemporaryError extends Error {}

  // Raised when S3 rejects a form because it expired before the file was sent.
  class FormExpiredError extends Error {
    constructor() {
      super("the upload form expired");
    }
  }

  function csrfToken() {
    return JSON.parse(document.body.getAttribute("hx-headers"))["x-csrftoken"];
  }

  function button(text, label) {
    const element = document.createElement("button");
    element.type = "button";
    element.textContent = text;
    element.setAttribute("aria-label", label);
    return element;
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
    bar.setAttribute("aria-label", "Upload progress of " + file.name);
    const state = document.createElement("span");
    state.className = "upload-state";
    // Screen readers announce each new state, such as "ready" or the reason for a rejection.
    state.setAttribute("aria-live", "polite");
    const cancel = button("Cancel", "Cancel the upload of " + file.name);
    const retry = button("Retry", "Retry the upload of " + file.name);
    retry.hidden = true;
    row.append(name, bar, state, cancel, retry);
    document.getElementById("upload-list").append(row);
    return {
      row,
      bar,
      state,
      cancel,
      retry,
      request: null,
      form: null,
      storedForm: null,
      cancelled: false,
    };
  }

  // Kinds: waiting, uploading, verifying, ready, rejected, failed, cancelled.
  function setState(view, text, kind) {
    view.state.textContent = text;
    view.row.dataset.state = kind;
    view.cancel.hidden = !["waiting", "uploading"].includes(kind);
    view.retry.hidden = kind !== "failed";
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

  // Requests from the app. fetch rejects with a TypeError, whose message is the browser's
  // own ("Failed to fetch" in Chromium), when no response arrives.
  async function fetchApp(url, options) {
    try {
      return await fetch(url, options);
    } catch (error) {
      throw error instanceof TypeError ? new TemporaryError(UNREACHABLE) : error;
    }
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

  // Returns the message of an error response from our app, whatever its body. The app's
  // 503 text advises a reload, which would lose the rows not yet sent, so the row names
  // its Retry button instead.
  async function errorMessage(response) {
    if (response.status === 503) {
      // 30 s is the Retry-After that the app sends with its 503 responses.
      const seconds = Number(response.headers.get("Retry-After")) || 30;
      return (
        "the gallery cannot reach its database or file storage right now. Wait " +
        seconds +
        " seconds, then choose Retry."
      );
    }
    const body = await readJson(response.clone());
    if (body && (body.error || body.detail)) return body.error || body.detail;
    const text = (await response.text()).trim();
    if (text && text.length < 200 && !text.startsWith("<")) return text;
    return "the server returned status " + response.status;
  }

  // Requests a signed form from the app. While too many uploads are pending, it waits for the
  // Retry-After time and requests again.
  // With HX-Request, the app returns 401 for a missing session instead of a redirect that
  // fetch would follow to the sign-in page. Accept keeps the app's error bodies JSON.
  async function requestForm(file, uploader, view) {
    for (let attempt = 1; ; attempt += 1) {
      const response = await fetchApp(uploader.dataset.createUrl, {
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
      if (response.ok) {
        const body = await readJson(response);
        if (body === null) throw new Error("the server returned an unexpected response");
        window.gallery.clearOutage();
        // The form reserved quota, which the quota line shows as an upload in progress.
        galleryChanged();
        return body;
      }
      if (response.status !== 429 || attempt >= MAX_FORM_ATTEMPTS) {
        throw new Error(await errorMessage(response));
      }
      setState(view, "waiting for earlier uploads to be checked", "waiting");
      await sleep(Number(response.headers.get("Retry-After")) || 5);
      if (view.cancelled) throw new CancelledError();
      setState(view, "uploading", "uploading");
    }
  }

  // Drops an upload the app issued a form for, so it no longer uses a pending slot. Best
  // effort: the worker's sweep deletes it anyway once its form has expired.
  function dropForm(form) {
    if (!form) return Promise.resolve();
    return fetch(form.cancel_url, {
      method: "DELETE",
      headers: { "x-csrftoken": csrfToken(), "HX-Request": "true" },
      credentials: "same-origin",
    })
      .then(galleryChanged)
      .catch(() => undefined);
  }

  // Reports the upload done and puts the tile the app returns at the top of the grid.
  async function completeUpload(form, uploader) {
    const response = await fetchApp(form.complete_url, {
      method: "POST",
      headers: { "x-csrftoken": csrfToken(), "HX-Request": "true" },
      credentials: "same-origin",
    });
    if (response.status === 401) {
      throw signedOut(response, uploader);
    }
    if (response.status >= 500) {
      throw new TemporaryError(await errorMessage(response));
    }
    if (!response.ok) {
      throw new Error(await errorMessage(response));
    }
    window.gallery.clearOutage();
    const text = await response.text();
    htmx.swap("#grid", text, { swapStyle: "afterbegin" });
    galleryChanged();
  }

  // Has the gallery page fetch its image count and quota line again.
  function galleryChanged() {
    htmx.trigger(document.body, "galleryChanged");
  }

  function formExpired(form, request) {
    const expiredByClock = Date.now() / 1000 >= form.expires_at;
    const expiredByS3 = request.status === 403 && /expired/i.test(request.responseText || "");
    return expiredByClock || expiredByS3;
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
      view.request = request;
      request.open("POST", form.url);
      request.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) {
          view.bar.value = Math.round((100 * event.loaded) / event.total);
        }
      });
      request.addEventListener("load", () => {
        if (request.status === 201 || request.status === 204) {
          resolve();
        } else if (formExpired(form, request)) {
          reject(new FormExpiredError());
        } else {
          reject(new Error("storage rejected the file (" + request.status + ")"));
        }
      });
      request.addEventListener("error", () => {
        reject(formExpired(form, request) ? new FormExpiredError() : new Error("network error"));
      });
      request.addEventListener("abort", () => reject(new CancelledError()));
      request.send(data);
    });
  }

  // Sends the file with a fresh form when its first form expired before the file was sent,
  // as happens when the page waited long behind other uploads. It refreshes once only.
  async function sendFile(file, uploader, view) {
    for (let refreshes = 0; ; refreshes += 1) {
      view.form = await requestForm(file, uploader, view);
      if (view.cancelled) throw new CancelledError();
      try {
        await postToS3(view.form, file, view);
        return view.form;
      } catch (error) {
        if (!(error instanceof FormExpiredError) || refreshes >= 1) throw error;
        await dropForm(view.form);
        view.form = null;
        view.bar.value = 0;
      }
    }
  }

  // `view.storedForm` is the form whose file S3 has stored while "done" has not succeeded.
  // A retry then reports the same upload done again, so no second copy is sent.
  async function upload(file, view, uploader) {
    setState(view, "uploading", "uploading");
    try {
      const form = view.storedForm || (await sendFile(file, uploader, view));
      view.form = form;
      view.storedForm = form;
      view.bar.value = 100;
      setState(view, "verifying", "verifying");
      await completeUpload(form, uploader);
      view.storedForm = null;
      follow(form.id, view);
    } catch (error) {
      if (error instanceof SignedOutError) {
        stopUploads(error, view);
        return;
      }
      if (error instanceof CancelledError || view.cancelled) {
        await dropForm(view.form);
        setState(view, "cancelled", "cancelled");
        return;
      }
      // Dropping the form would delete the stored file, which "done" can still report.
      if (view.storedForm && error instanceof TemporaryError) {
        setState(view, "failed: " + error.message, "failed");
        return;
      }
      view.storedForm = null;
      await dropForm(view.form);
      setState(view, "failed: " + error.message, "failed");
    } finally {
      view.request = null;
      view.form = null;
    }
  }

  // Updates the row from the tile's state, which the tile's own polling keeps current.
  function follow(uploadId, view) {
    followed.set(uploadId, view);
    updateFromTile(document.getElementById("tile-" + uploadId));
  }

  function updateFromTile(tile) {
    if (!tile || !tile.id.startsWith("tile-")) return;
    const uploadId = tile.id.slice("tile-".length);
    const view = followed.get(uploadId);
    if (!view) return;
    const state = tile.dataset.state;
    if (state === "ready") {
      setState(view, "ready", "ready");
    } else if (state === "rejected") {
      const reason = tile.querySelector(".reason");
      setState(view, reason ? reason.textContent.trim().toLowerCase() : "rejected", "rejected");
    } else {
      return;
    }
    followed.delete(uploadId);
  }

  document.addEventListener("htmx:load", (event) => updateFromTile(event.detail.elt));

  // Marks the queued uploads too, since none can succeed, and opens the sign-in page.
  function stopUploads(error, view) {
    const queued = queue.splice(0).map((item) => item.view);
    for (const stopped of [view, ...queued]) {
      setState(stopped, error.message, "failed");
    }
    window.location.assign(error.signinUrl);
  }

  function pump(uploader) {
    const parallel = Number(uploader.dataset.parallelUploads) || 1;
    while (running < parallel && queue.length > 0) {
      const { file, view } = queue.shift();
      running += 1;
      upload(file, view, uploader).finally(() => {
        running -= 1;
        pump(uploader);
      });
    }
  }

  function cancel(item) {
    const { view } = item;
    view.cancelled = true;
    const position = queue.indexOf(item);
    if (position >= 0) {
      queue.splice(position, 1);
      setState(view, "cancelled", "cancelled");
    } else if (view.request) {
      view.request.abort();
    }
  }

  function enqueue(item, uploader) {
    item.view.cancelled = false;
    item.view.bar.value = 0;
    setState(item.view, "waiting", "waiting");
    queue.push(item);
  }

  function addFiles(files, uploader) {
    for (const file of files) {
      const view = addRow(file);
      const problem = problemWith(file, uploader);
      if (problem) {
        setState(view, problem, "rejected");
        continue;
      }
      const item = { file, view };
      view.cancel.addEventListener("click", () => cancel(item));
      view.retry.addEventListener("click", () => {
        enqueue(item, uploader);
        pump(uploader);
      });
      enqueue(item, uploader);
    }
    pump(uploader);
  }

  // Dropping anywhere on the page uploads; the overlay shows while files are dragged over it.
  function watchDrops(uploader) {
    const overlay = document.getElementById("drop-overlay");
    let depth = 0;
    const carriesFiles = (event) => Array.from(event.dataTransfer.types).includes("Files");
    document.addEventListener("dragenter", (event) => {
      if (!carriesFiles(event)) return;
      depth += 1;
      overlay.hidden = false;
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) overlay.hidden = true;
    });
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      depth = 0;
      overlay.hidden = true;
      addFiles(Array.from(event.dataTransfer.files), uploader);
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const uploader = document.getElementById("uploader");
    if (!uploader) return;
    document.getElementById("picker-row").hidden = false;
    // Shows the hints about the picker and dropping files, which only work with JavaScript.
    document.documentElement.classList.add("js");
    const input = document.getElementById("file-input");
    input.addEventListener("change", () => {
      addFiles(Array.from(input.files), uploader);
      input.value = "";
    });
    watchDrops(uploader);
  });
})();
