"""The web chat demo: the OpenAI-compatible server with every checkpoint in out/ loaded, and its chat page.

    python -m scripts.web_demo                          # all of out/*.pth, page at http://127.0.0.1:8998/
    python -m scripts.web_demo --weight full_sft dpo    # just these stages
    python -m scripts.web_demo --open_browser 1         # and open the page

The page (scripts/web/index.html) picks the checkpoint, temperature, top-p, answer length, history and system prompt,
and streams answers over the same /v1/chat/completions endpoint any OpenAI client uses. All server flags apply
(see `python -m scripts.serve_openai_api --help`); binding to anything but localhost should come with --api_key.
"""
import argparse
import threading
import time
import urllib.request
import webbrowser

from scripts.serve_openai_api import add_server_args, serve


def open_when_ready(url: str, timeout: float = 300.0):
    """Poll /health until the server answers (models load first, which can take a while), then open the page."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "health", timeout=2).close()
            webbrowser.open(url)
            return
        except OSError:
            time.sleep(0.5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser, default_weights=["all"])
    parser.add_argument("--open_browser", type=int, default=0, choices=[0, 1],
                        help="1: open the chat page in the default browser once the server starts")
    args = parser.parse_args(argv)
    args.web_ui = 1
    if args.open_browser:
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
        threading.Thread(target=open_when_ready, args=(url,), daemon=True).start()
    serve(args)


if __name__ == "__main__":
    main()
