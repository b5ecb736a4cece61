"""A Slack export folder -> one record per chat message.

The export layout: `users.json` (list of users), `channels.json` (list of channels; also groups.json,
mpims.json, dms.json), and one folder per channel holding `YYYY-MM-DD.json` files, each a JSON array of
messages. Each message becomes

    {"text", "meta": {"channel", "user", "user_name", "ts", "thread": thread_ts or ts, "subtype"?},
     "provenance": {"source": day file, "line": index of the message in that file (1-based),
                    "ref": "channel/ts"}}

Slack's markup is resolved so the text reads as people saw it: `<@U123>` -> `@Ana`, `<#C1|general>` ->
`#general`, `<!here>` -> `@here`, `<https://x|label>` -> `label (https://x)`, and &amp; &lt; &gt; unescaped.
Joins and leaves are rejected (`chat_join_leave`), as are other system notices (`chat_system_message`),
messages without text (`empty_message`) and elements that are not message objects (`invalid_message`).
A day file that is not a JSON array is one Problem (`invalid_json`); the other days are still read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from hone.data.readers import DataError, clip_raw, json_type
from hone.data.sources import SourceStats
from hone.records import Problem

CHANNEL_LISTS = ("channels.json", "groups.json", "mpims.json", "dms.json")
JOIN_LEAVE = frozenset({"channel_join", "channel_leave", "group_join", "group_leave"})
# Notices Slack writes itself: not something a person said.
SYSTEM_SUBTYPES = frozenset({"channel_topic", "channel_purpose", "channel_name", "channel_archive",
                             "channel_unarchive", "group_topic", "group_purpose", "group_name", "group_archive",
                             "group_unarchive", "pinned_item", "unpinned_item", "bot_add", "bot_remove",
                             "reminder_add", "tombstone"})
_DAY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.json$")
_MARKUP = re.compile(r"<([^<>]*)>")


def is_slack_export(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in ("users.json",) + CHANNEL_LISTS)


def load_users(folder: Path) -> dict[str, str]:
    """User id -> the name people see (display name, else real name, else user name)."""
    path = folder / "users.json"
    if not path.is_file():
        return {}
    users = _load_json_list(path)
    names = {}
    for u in users:
        if isinstance(u, dict) and isinstance(u.get("id"), str):
            names[u["id"]] = _display_name(u.get("profile"), u)
    return names


def channel_dirs(folder: Path) -> list[Path]:
    """Channel folders (any folder holding YYYY-MM-DD.json files), sorted by name."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and any(_DAY_FILE.match(f.name) for f in d.iterdir()))


def read_slack(path: str | Path, stats: SourceStats | None = None) -> Iterator[dict | Problem]:
    """Records for every message of every channel of an export folder, channel by channel, day by day."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: a Slack export must be a folder (unzip the export first)")
    for name in CHANNEL_LISTS:
        if (folder / name).is_file():
            _load_json_list(folder / name)  # a broken channel list is a broken export: say so up front
    users = load_users(folder)
    dirs = channel_dirs(folder)
    if not dirs:
        raise DataError(f"{folder}: no channel folders with YYYY-MM-DD.json files; is this a Slack export?")
    stats = stats if stats is not None else SourceStats()
    stats.counts["slack_channels"] += len(dirs)
    for d in dirs:
        for day in sorted(f for f in d.iterdir() if _DAY_FILE.match(f.name)):
            yield from read_day(day, d.name, users)


def read_day(path: Path, channel: str, users: dict[str, str]) -> Iterator[dict | Problem]:
    """One day file of one channel: a record or Problem per element of its JSON array."""
    try:
        messages = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        yield Problem(str(path), 1, "invalid_json", f"day file is not valid JSON: {e}; its messages are skipped",
                      raw=clip_raw(path.read_bytes()[:2000].decode("utf-8", errors="replace")))
        return
    if not isinstance(messages, list):
        yield Problem(str(path), 1, "invalid_json",
                      f"day file must hold a JSON array of messages, found {json_type(messages)}")
        return
    for index, message in enumerate(messages, 1):
        yield message_record(message, channel, users, str(path), index)


def message_record(message: object, channel: str, users: dict[str, str], source: str,
                   index: int) -> dict | Problem:
    """The record for one Slack message, or a Problem (join/leave, system notice, no text, not a message)."""
    raw = clip_raw(json.dumps(message, ensure_ascii=False, default=str))
    if not isinstance(message, dict):
        return Problem(source, index, "invalid_message",
                       f"message {index} is a JSON {json_type(message)}, not an object", raw=raw)
    ts, subtype = message.get("ts"), message.get("subtype")
    subtype = subtype if isinstance(subtype, str) else None  # exports hold odd values; never crash on them
    where = f"message {channel}/{ts}" if isinstance(ts, str) else f"message {index}"
    if not isinstance(ts, str) or not ts:
        return Problem(source, index, "invalid_message", f"{where} has no 'ts' (timestamp) string", raw=raw)
    if subtype in JOIN_LEAVE:
        return Problem(source, index, "chat_join_leave", f"{where} is a {subtype} notice, not a message", raw=raw)
    if subtype in SYSTEM_SUBTYPES:
        return Problem(source, index, "chat_system_message", f"{where} is a {subtype} notice", raw=raw)
    text = message.get("text")
    if not isinstance(text, str) or not text.strip():
        return Problem(source, index, "empty_message", f"{where} has no text"
                       + (" (files only)" if message.get("files") else ""), raw=raw)
    user = message.get("user") if isinstance(message.get("user"), str) else message.get("bot_id")
    user = user if isinstance(user, str) else None
    user_name = users.get(user) if user else None
    if not user_name:
        user_name = _display_name(message.get("user_profile"), {"name": message.get("username")}) or user
    thread = message.get("thread_ts")
    meta = {"channel": channel, "user": user, "user_name": user_name, "ts": ts,
            "thread": thread if isinstance(thread, str) and thread else ts}
    if subtype:
        meta["subtype"] = subtype
    return {"text": resolve_markup(text, users), "meta": meta,
            "provenance": {"source": source, "line": index, "ref": f"{channel}/{ts}"}}


def resolve_markup(text: str, users: dict[str, str]) -> str:
    """Slack's `<...>` markup as people see it (see the module docstring); unknown users stay as @ID."""

    def replace(m: re.Match) -> str:
        inner = m.group(1)
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            return "@" + (users.get(target[1:]) or label or target[1:])
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!"):
            return "@" + (label.lstrip("@") or target[1:].split("^")[0])
        if label and label not in target:
            return f"{label} ({target})"
        return target

    text = _MARKUP.sub(replace, text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _display_name(profile: object, user: dict) -> str | None:
    profile = profile if isinstance(profile, dict) else {}
    for value in (profile.get("display_name"), profile.get("real_name"), user.get("real_name"), user.get("name")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _load_json_list(path: Path) -> list:
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array, found {json_type(value)}")
    return value
