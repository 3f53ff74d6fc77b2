"""Build the Studio's Gradio Blocks on top of a StudioService, and mount them.

The page reads everything from `service` (the same object behind the REST API), so a
reload or a second browser shows the same jobs and model, and a running fine-tune never
depends on an open page.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from sage_ray.serve.promotion import Promotion
from sage_ray.ui import chat_tab, finetune_tab, models_tab

TITLE = "sage-ray Studio"
TAGLINE = "Upload a JSON dataset, fine-tune with LoRA on Ray, then chat with your model."
CSS_PATH = Path(__file__).with_name("studio.css")
# Gradio 6 takes theme and CSS at launch/mount time, not in gr.Blocks().
# System fonts only: the default theme fonts come from Google Fonts, which a cluster
# without internet access cannot reach (the page then waits on them).
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
# Hover text for the model dropdowns' options: the full path, from the map the model card
# carries (#sr-model-paths). Re-applied on DOM changes since Gradio re-renders the options.
HOVER_JS = """<script>
(() => {
  let queued = false;
  const apply = () => {
    queued = false;
    const holder = document.getElementById("sr-model-paths");
    if (!holder) return;
    let paths;
    try { paths = JSON.parse(holder.dataset.paths || "{}"); } catch (e) { return; }
    const sel = ["#model-dropdown", "#compare-model-a", "#compare-model-b"]
      .map((id) => id + " li[role=option]").join(",");
    document.querySelectorAll(sel).forEach((li) => {
      const path = paths[li.getAttribute("aria-label")];
      if (path && li.title !== path) li.title = path;
    });
  };
  new MutationObserver(() => {
    if (!queued) { queued = true; requestAnimationFrame(apply); }
  }).observe(document.documentElement, { childList: true, subtree: true });
})();
</script>"""
# The live log view shows its newest lines: Gradio's autoscroll leaves a log that first
# arrives while its panel is hidden (or replaced whole on each refresh) scrolled to the top.
# It stays pinned to the bottom until the user scrolls up, and pins again at the bottom.
LOG_TAIL_JS = """<script>
(() => {
  const pinned = new WeakMap();
  const atBottom = (t) => t.scrollTop + t.clientHeight >= t.scrollHeight - 24;
  setInterval(() => {
    const t = document.querySelector("#task-logs textarea");
    if (!t) return;
    if (!pinned.has(t)) {
      pinned.set(t, true);
      t.addEventListener("scroll", () => pinned.set(t, atBottom(t)), { passive: true });
    }
    if (pinned.get(t) && t.clientHeight && !atBottom(t)) t.scrollTop = t.scrollHeight;
  }, 300);
})();
</script>"""
# Chat streams and service calls block in worker threads; one slow chat must not
# hold up another browser's table refresh (Gradio's default is 1 per event).
CONCURRENCY = 8


def _header() -> None:
    gr.HTML(f'<div class="sr-header"><h1>{TITLE}</h1><span class="sr-tag">{TAGLINE}</span></div>',
            elem_id="studio-header")


def build_ui(service, promotion=None) -> gr.Blocks:
    """The Studio page: Finetune, Chat and Models tabs over `service`; compare, gated switch and
    rollback go through `promotion` (default: Promotion(service), as the REST API does)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        _header()
        with gr.Tabs(elem_id="studio-tabs"):
            with gr.Tab("Finetune", id="finetune", elem_id="tab-finetune"):
                finetune = finetune_tab.build(service)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = chat_tab.build()
            with gr.Tab("Models", id="models", elem_id="tab-models") as models_item:
                models = models_tab.build()
        finetune_tab.wire(finetune, service, promotion or Promotion(service), blocks, chat.header)
        chat_tab.wire(chat, service)
        models_tab.wire(models, service, blocks, models_item)
    blocks.queue(default_concurrency_limit=CONCURRENCY)
    return blocks


def launch_kwargs() -> dict:
    """Theme, stylesheet and page script, for `blocks.launch(**launch_kwargs())` or
    `gr.mount_gradio_app(..., **launch_kwargs())` (Gradio 6 takes them there)."""
    return {"theme": THEME, "css_paths": [CSS_PATH], "head": HOVER_JS + LOG_TAIL_JS}


def mount_ui(fastapi_app, service, path: str = "/", **mount_kwargs):
    """Mount the Studio page on `fastapi_app` at `path`, with its theme, stylesheet and script.

    Routes the app already has (/v1, /api) keep working only if they were added before
    this call: a mount at "/" matches every path not matched earlier. `mount_kwargs`
    (e.g. auth=...) go to `gr.mount_gradio_app`.
    """
    return gr.mount_gradio_app(fastapi_app, build_ui(service), path=path,
                               **{**launch_kwargs(), **mount_kwargs})
