// Uploads each chosen file straight to S3 with a presigned POST form, then reports it done.
// The request to S3 is a plain XMLHttpRequest: htmx headers on it would trigger CORS
// preflights, and XMLHttpRequest reports upload progress.
"use strict";

(function () {
  const MAX_PARALLEL_UPLOADS = 3;
  // How often a form request is repeated while the server answers 429 Too Many Requests.
  const MAX_FORM_ATTEMPTS = 30;
  const queue = [];
  let running = 0;

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
    if (file.size < 1 || file.size > maxBytes) {
      const limitMiB = Number((maxBytes / 1048576).toFixed(1));
      return "rejected: larger than the " + limitMiB + " MiB limit";
    }
    return null;
  }

  function sleep(seconds) {
    return new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }

  // Asks the app to sign a form; while too many uploads are pending, waits as told and asks again.
  async function requestForm(file, uploader, view) {
    for (let attempt = 1; ; attempt += 1) {
      const response = await fetch(uploader.dataset.createUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", "x-csrftoken": csrfToken() },
        body: JSON.stringify({
          filename: file.name,
          content_type: contentType(file),
          size: file.size,
        }),
        credentials: "same-origin",
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        return body;
      }
      const message = body.error || body.detail || "the server returned status " + response.status;
      if (response.status !== 429 || attempt >= MAX_FORM_ATTEMPTS) {
        throw new Error(message);
      }
      setState(view, "waiting for earlier uploads to be checked", "waiting");
      await sleep(Number(response.headers.get("Retry-After")) || 5);
      setState(view, "uploading", "uploading");
    }
  }

  // Reports the upload done and puts the tile the app returns at the top of the grid.
  async function completeUpload(form) {
    const response = await fetch(form.complete_url, {
      method: "POST",
      headers: { "x-csrftoken": csrfToken(), "HX-Request": "true" },
      credentials: "same-origin",
    });
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
      await completeUpload(form);
      setState(view, "uploaded", "done");
    } catch (error) {
      setState(view, "failed: " + error.message, "failed");
    }
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

  // Counts a tile that a delete button removed.
  document.addEventListener("htmx:afterRequest", (event) => {
    if (event.detail.successful && event.detail.requestConfig.verb.toLowerCase() === "delete") {
      changeCount(-1);
    }
  });

  // htmx drops error bodies by default; show them in the message area instead.
  document.addEventListener("htmx:responseError", (event) => {
    const messages = document.getElementById("messages");
    const text = event.detail.xhr.responseText || "The request failed.";
    messages.textContent = text.length > 200 ? "The request failed." : text;
  });
})();
