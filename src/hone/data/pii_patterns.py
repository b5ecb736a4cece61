"""The PII patterns behind `hone data redact`: regexes, checksum validators and the rules that pick spans.

Each `PiiPattern` is a compiled regex, the group that holds the PII, a base score and an optional validator
(Luhn for cards, ISO 13616 mod-97 for IBANs, `ipaddress` for IPs, ...). The same patterns serve both
engines in redact.py: wrapped as a Presidio recogniser (for the types Presidio lacks: URL_WITH_TOKEN,
SECRET, PERSON-in-context), or run directly with `re` for every type when Presidio cannot start.

Two cheap rules keep it fast and precise without costing recall:
- `triggered_types(text)`: a type's *necessary* condition (EMAIL needs "@", IBAN needs two capitals and two
  digits, ...). A type whose trigger is absent cannot match, so its recognisers are not run at all.
- `drop_false_positives` / `resolve_overlaps`: a dotted quad after "version"/"v"/"build" is a version,
  not an IP; of overlapping spans the longer wins (an e-mail inside a tokened URL goes with the URL).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Every type redact knows, in report order. STRUCTURED ones have a fixed shape (and the >= 0.98 recall bar).
STRUCTURED_TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "US_SSN", "UK_NINO",
                    "URL_WITH_TOKEN", "SECRET")
PII_TYPES = STRUCTURED_TYPES + ("PERSON",)
# Shorthands accepted by --types.
TYPE_GROUPS = {"NATIONAL_ID": ("US_SSN", "UK_NINO")}


@dataclass(frozen=True)
class Found:
    """One detected span: text[start:end] is PII of `type`, with the detector's confidence `score`."""

    start: int
    end: int
    type: str
    score: float


@dataclass(frozen=True)
class PiiPattern:
    type: str
    name: str
    regex: re.Pattern
    score: float
    group: int = 0
    validate: Callable[[str], bool] | None = None


# --- validators ------------------------------------------------------------------------------------------

def luhn_ok(number: str) -> bool:
    """Luhn checksum over the digits of `number` (separators ignored)."""
    digits = [int(c) for c in number if c.isdigit()]
    if not digits:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Issuer prefixes of the card networks (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro):
# with Luhn alone one random 16-digit number in ten would pass.
_CARD_PREFIX = re.compile(r"4|5[0-9]|2[2-7]|3[0456789]|6[0-9]")


def card_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


def iban_ok(text: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers, the whole mod 97 == 1."""
    s = re.sub(r"[\s-]", "", text).upper()
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def ipv6_ok(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return text.count(":") >= 2 and any(c not in ":0" for c in text)  # "::" and "0::0" say nothing


def phone_ok(text: str) -> bool:
    return 7 <= sum(c.isdigit() for c in text) <= 15


def secret_value_ok(value: str) -> bool:
    """A value after 'password:' is a secret, not prose ('password: reset'), if it is not a plain word."""
    plain_word = value.isalpha() and value.islower()
    return len(value) >= 4 and (not plain_word or len(value) >= 16)


_NAME_STOP = frozenset("""all again both customer customers everyone everybody folks friend friends guys
hello hi madam sir sirs support team there thanks regards best service sales billing admin dear tech good
morning afternoon evening sorry please yes no ok okay hope i we our your you it in on at the this that so
for very much monday tuesday wednesday thursday friday saturday sunday january february march april may june
july august september october november december welcome greetings happy new update urgent re fw fwd
""".split())


def name_ok(text: str) -> bool:
    return text.split()[0].lower() not in _NAME_STOP


# --- the patterns ----------------------------------------------------------------------------------------

_URL_TOKEN_PARAM = re.compile(
    r"(?i)[?&;#/](?:[a-z0-9]+[_.-])*(?:access|refresh|auth|id|session|reset|invite|magic|api|private|share)?[_-]?"
    r"(?:token|key|apikey|session(?:_?id)?|j?sessionid|phpsessid|sessid|sid|password|passwd|pwd|secret|sig|signature|code|"
    r"credential|auth)(?:[_-][a-z0-9]*)?[=/]\S")


# Or a one-time path: /reset/<token>, /verify/<id>/<token>, ...
_URL_TOKEN_PATH = re.compile(r"(?i)/(?:reset|confirm|verify|activate|invite|magic|unsubscribe)[\w-]*/"
                             r"(?:[^/?#\s]+/)*[A-Za-z0-9_-]{12,}")


def url_has_token(url: str) -> bool:
    return bool(_URL_TOKEN_PARAM.search(url) or _URL_TOKEN_PATH.search(url))


# Capitalised words, Latin-1 and Latin Extended-A letters included (Tomás, Kateřina Dvořák).
_UPPER, _LOWER = "A-ZÀ-ÖØ-Þ\u0100-\u017f", "a-zß-öø-ÿ\u0100-\u017f"
_NAME = rf"(?:[A-Z]'|Mc|Mac)?[{_UPPER}][{_LOWER}]+(?:-[{_UPPER}][{_LOWER}]+)?"
_FULL_NAME = rf"{_NAME}(?:[ ]{_NAME}){{0,2}}"
_SIGN_OFF = (r"best|kind regards|warm regards|best regards|many thanks|thanks|thank you|cheers|regards|"
             r"sincerely|yours sincerely|yours truly|best wishes|all the best|respectfully")


def _p(type_: str, name: str, regex: str, score: float, group: int = 0,
       validate: Callable[[str], bool] | None = None) -> PiiPattern:
    return PiiPattern(type_, name, re.compile(regex), score, group, validate)


PATTERNS: tuple[PiiPattern, ...] = (
    _p("EMAIL", "email", r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+'-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}"
       r"(?![\w-])", 1.0),
    _p("PHONE", "international", r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,5}(?![\w-])",
       0.75, validate=phone_ok),
    _p("PHONE", "north_american", r"(?<![\w+-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])",
       0.75, validate=phone_ok),
    _p("PHONE", "uk_national", r"(?<![\w+-])0\d{2,4} ?\d{3,4} ?\d{3,4}(?![\w-])", 0.6, validate=phone_ok),
    _p("CREDIT_CARD", "card", r"(?<![\d.-])\d(?:[ .-]?\d){12,18}(?![\d-]|\.\d)", 1.0, validate=card_ok),
    # Upper or lower case, not mixed: a mixed pattern would swallow the next word ("... 5295 was").
    _p("IBAN", "iban", r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b", 1.0,
       validate=iban_ok),
    _p("IBAN", "iban_lower", r"\b[a-z]{2}\d{2}(?:[ ]?[a-z0-9]{4}){2,7}(?:[ ]?[a-z0-9]{1,3})?\b", 1.0,
       validate=iban_ok),
    _p("IP_ADDRESS", "ipv4", r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
       r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)", 0.9),
    _p("IP_ADDRESS", "ipv6", r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])", 0.9,
       validate=ipv6_ok),
    _p("US_SSN", "ssn_dashed", r"(?<![\w-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\w-])", 0.85),
    _p("US_SSN", "ssn_in_context", r"(?i)\b(?:ssn|social security(?: number| no\.?| #)?)\W{0,4}(?:is\W{1,3})?"
       r"((?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4})\b", 0.85, group=1),
    _p("UK_NINO", "nino", r"(?i)\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?"
       r"[A-D]\b", 0.85),
    _p("URL_WITH_TOKEN", "url", r"(?i)\b(?:https?|ftp)://[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]}]", 0.9,
       validate=url_has_token),
    _p("SECRET", "aws_access_key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b", 1.0),
    _p("SECRET", "github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", 1.0),
    _p("SECRET", "gitlab_token", r"\bgl(?:pat|dt|rt|ptt)-[A-Za-z0-9_-]{20,}", 1.0),
    _p("SECRET", "sendgrid_key", r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b", 1.0),
    _p("SECRET", "slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", 1.0),
    _p("SECRET", "slack_webhook", r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+", 1.0),
    _p("SECRET", "openai_style_key", r"\bsk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}", 1.0),
    _p("SECRET", "stripe_key", r"\b[rsp]k_(?:live|test)_[A-Za-z0-9]{16,}\b", 1.0),
    _p("SECRET", "google_api_key", r"\bAIza[0-9A-Za-z_-]{35}\b", 1.0),
    _p("SECRET", "jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}", 1.0),
    _p("SECRET", "private_key_block", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
       r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", 1.0),
    _p("SECRET", "bearer", r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{20,}=*)", 0.9, group=1),
    _p("SECRET", "assignment", r"(?i)\b(?:[a-z0-9]+[_-])*(?:api[_-]?key|apikey|api[_-]?secret|secret(?:[_-]?key)?|"
       r"client[_-]?secret|access[_-]?token|auth[_-]?token|refresh[_-]?token|token|password|passwd|pwd|"
       r"passphrase|private[_-]?key|secret[_-]?access[_-]?key)[\"']?[ \t]*[:=][ \t]*[\"']?([^\s\"'`,;]{4,})",
       0.8, group=1, validate=secret_value_ok),
    _p("PERSON", "greeting", rf"(?:^|(?<=[\s>(]))(?i:hi|hello|hey|dear|good morning|good afternoon|"
       rf"good evening|thanks|thank you)[ ,]+({_FULL_NAME})(?=[ ]*[,!:\n]|[ ]*$)", 0.7, group=1, validate=name_ok),
    _p("PERSON", "sign_off", rf"(?m)^[ \t]*(?i:{_SIGN_OFF})[ \t]*[,!.]?[ \t]*\r?\n[ \t]*(?:-{{1,2}}[ \t]*)?"
       rf"({_FULL_NAME})[ \t]*$", 0.7, group=1, validate=name_ok),
    _p("PERSON", "sign_off_same_line", rf"(?m)(?i:{_SIGN_OFF}),[ \t]+({_FULL_NAME})[ \t]*$", 0.7, group=1,
       validate=name_ok),
    _p("PERSON", "my_name_is", rf"(?i:my name is|my name's)[ ]+({_FULL_NAME})", 0.7, group=1, validate=name_ok),
    _p("PERSON", "introduction", rf"(?i:this is|i'm|i am)[ ]+({_FULL_NAME})(?=[ ]+from\b)", 0.7, group=1,
       validate=name_ok),
    _p("PERSON", "field", rf"(?m)^[ \t]*(?i:name|full name|customer name|contact name|contact|customer|requester|"
       rf"from|to|cc|assignee|agent|reported by|submitted by|account holder|cardholder)[ \t]*:[ \t]*"
       rf"({_FULL_NAME})\b", 0.7, group=1, validate=name_ok),
    _p("PERSON", "honorific", rf"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?[ ]({_NAME}(?:[ ]{_NAME})?)", 0.7, group=1),
    _p("PERSON", "handed_over", rf"(?i:spoke to|spoke with|talked to|assigned to|escalated to|forwarded to|"
       rf"ask for|asked for|cc'd|cc)[ ]+({_NAME}[ ]{_NAME})\b", 0.6, group=1, validate=name_ok),
)

# Necessary conditions: if a type's trigger does not match, none of its patterns (nor Presidio's) can.
TRIGGERS: dict[str, re.Pattern] = {
    "EMAIL": re.compile("@"),
    "PHONE": re.compile(r"\d(?:\D{0,3}\d){4}"),
    "CREDIT_CARD": re.compile(r"\d(?:[ .-]?\d){12}"),
    "IBAN": re.compile(r"[A-Za-z]{2}\d{2}"),
    "IP_ADDRESS": re.compile(r"\d\.\d|[0-9A-Fa-f]?:[0-9A-Fa-f]*:"),
    "US_SSN": re.compile(r"\d{3}\D?\d{2}\D?\d{4}"),
    "UK_NINO": re.compile(r"[A-Za-z]{2} ?\d{2} ?\d{2} ?\d{2}"),
    "URL_WITH_TOKEN": re.compile(r"://"),
    "SECRET": re.compile(r"[:=]|AKIA|ASIA|gh[pousr]_|github_pat|gl(?:pat|dt|rt|ptt)-|SG\.|xox|sk-|_live_|_test_|AIza|eyJ|-----BEGIN|"
                         r"(?i:bearer)"),
    "PERSON": re.compile(r"(?i)\b(?:hi|hello|hey|dear|good|thanks|thank|best|kind|warm|regards|many|cheers|"
                         r"sincerely|yours|all|respectfully|my|this|i'm|i am|name|contact|customer|requester|"
                         r"from|to|cc|assignee|agent|reported|submitted|account|cardholder|mr|mrs|ms|miss|dr|"
                         r"prof|spoke|talked|assigned|escalated|forwarded|ask|asked|cc'd)\b"),
}

_ID_CHAR = re.compile(r"[\w#/-]")
_VERSION_BEFORE = re.compile(r"(?i)(?:\b(?:version|ver\.?|release|build|firmware|v)\s?)$")


def find_with_patterns(text: str, types: Iterable[str], patterns: Iterable[PiiPattern] = PATTERNS) -> list[Found]:
    """Every raw match (overlaps included) of the patterns for `types` in `text`."""
    wanted = set(types)
    found = []
    for pat in patterns:
        if pat.type not in wanted:
            continue
        for m in pat.regex.finditer(text):
            start, end = m.span(pat.group)
            if start < 0 or start == end:
                continue
            if pat.validate is None or pat.validate(text[start:end]):
                found.append(Found(start, end, pat.type, pat.score))
    return found


def triggered_types(text: str, types: Iterable[str], triggers: dict[str, re.Pattern] = TRIGGERS) -> list[str]:
    """The subset of `types` whose necessary condition holds in `text` (see the module docstring)."""
    return [t for t in types if t not in triggers or triggers[t].search(text)]


def drop_false_positives(text: str, found: Iterable[Found]) -> list[Found]:
    """Remove known look-alikes: version strings ('version 1.2.3.4') taken for IPs, ids taken for phones."""
    kept = []
    for f in found:
        if f.type == "IP_ADDRESS" and _VERSION_BEFORE.search(text[max(0, f.start - 12):f.start]):
            continue
        if f.type == "PHONE" and f.start and _ID_CHAR.match(text[f.start - 1]):
            continue  # TCK-2024-000318, #4471-2231: the tail of an identifier, not a phone number
        kept.append(f)
    return kept


def resolve_overlaps(found: Iterable[Found]) -> list[Found]:
    """Non-overlapping spans in text order: of overlapping spans the longer, then higher-scoring, wins,
    except that a PERSON span (fuzzy, from context or NER) never displaces a structured one."""
    chosen: list[Found] = []
    for f in sorted(found, key=lambda f: (f.type == "PERSON", -(f.end - f.start), -f.score, f.start)):
        if all(f.end <= c.start or f.start >= c.end for c in chosen):
            chosen.append(f)
    return sorted(chosen, key=lambda f: f.start)
