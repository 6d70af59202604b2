// The mlx-sd web page: a form over the server's A1111 API. A generation is one /sdapi/v1/txt2img request with
// its own task id; /sdapi/v1/progress is polled for that task's step and preview; Cancel aborts the request, and
// the server cancels a job whose client has gone at its next step.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

async function api(path, options) {
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.detail || response.statusText);
  return data;
}

function fill(select, items, keep) {
  for (const [value, label] of items) select.add(new Option(label, value));
  if (keep !== undefined) select.value = keep;
}

async function loadChoices() {
  const [samplers, models, loras, options] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/loras"), api("/sdapi/v1/options"),
  ]);
  fill($("sampler"), samplers.map((s) => [s.name, s.name]));
  fill($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
  fill($("lora"), loras.map((l) => [l.name, l.name]));
  $("model-status").textContent = `model: ${options.sd_model_checkpoint}`;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function request(taskId) {
  let prompt = $("prompt").value;
  if ($("lora").value) prompt += ` <lora:${$("lora").value}:${$("lora_weight").value || 1}>`;
  return {
    prompt,
    negative_prompt: $("negative_prompt").value,
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    cfg_scale: number("cfg_scale"),
    seed: number("seed") ?? -1,
    sampler_name: $("sampler").value || undefined,
    override_settings: { sd_model_checkpoint: $("model").value },
    force_task_id: taskId,
  };
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function poll(taskId) {
  const p = await api(`/sdapi/v1/progress?t=${Date.now()}`);
  if (!controller || controller.taskId !== taskId) return;
  if (p.current_task !== taskId) {
    setStatus(p.current_task ? `waiting: another request is running (${p.state.queued} queued)` : "starting");
    return;
  }
  $("progress").value = p.progress;
  if (p.state.sampling_steps) setStatus(`step ${p.state.sampling_step} of ${p.state.sampling_steps}`);
  if (p.current_image) {
    $("preview").src = `data:image/png;base64,${p.current_image}`;
    $("preview").hidden = false;
  }
}

function showResult(data) {
  const info = JSON.parse(data.info);
  const url = `data:image/png;base64,${data.images[0]}`;
  $("result").src = url;
  $("result").hidden = false;
  $("preview").hidden = true;
  $("download").href = url;
  $("download").download = `mlx-sd-${info.seed}.png`;
  $("download").hidden = false;
  $("parameters").textContent = info.infotexts[0];
  $("progress").value = 1;
  setStatus(info.interrupted ? "interrupted" : `done: seed ${info.seed}`);
  $("model-status").textContent = `model: ${info.sd_model_name}`;
}

async function generate(event) {
  event.preventDefault();
  const taskId = `page-${Date.now()}-${Math.random().toString(36).slice(2, 10)}`;
  controller = new AbortController();
  controller.taskId = taskId;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("result").hidden = true;
  setStatus("queued");
  const timer = setInterval(() => poll(taskId).catch(() => {}), 250);
  try {
    const data = await api("/sdapi/v1/txt2img", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request(taskId)),
      signal: controller.signal,
    });
    showResult(data);
  } catch (error) {
    setStatus(error.name === "AbortError" ? "cancelled" : `error: ${error.message}`, error.name !== "AbortError");
  } finally {
    clearInterval(timer);
    controller = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

function cancel() {
  if (controller) controller.abort();
}

window.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  loadChoices().catch((error) => setStatus(`cannot reach the server: ${error.message}`, true));
});
