"""Pilot tests of the console's policy part against the FakeGateway: the prompt and its queue,
the Rules screen, "rule from this row", the verdict column and a peer's policy."""

from __future__ import annotations

from textual.widgets import Input, Select

from tests.tui.conftest import make_app, until
from tests.tui.fake_gateway import FakeGateway, fake_key
from tests.tui.screen_text import screen_text
from unclaw_tui import events as ev
from unclaw_tui.app import UnclawApp
from unclaw_tui.policy import Lifetime, make_rule
from unclaw_tui.screens.confirm_remove import ConfirmScreen
from unclaw_tui.screens.dashboard import DashboardScreen
from unclaw_tui.screens.peer_policy import PeerPolicyScreen
from unclaw_tui.screens.prompt import PromptScreen
from unclaw_tui.screens.rule_form import RuleFormScreen
from unclaw_tui.screens.rules import RulesScreen

BIG = (120, 40)


def on_prompt(app: UnclawApp, prompt_id: str | None = None) -> bool:
    screen = app.screen
    if not isinstance(screen, PromptScreen) or screen.shown is None:
        return False
    return prompt_id is None or screen.shown.id == prompt_id


def form_values(screen: RuleFormScreen) -> dict[str, str]:
    values = {f: screen.query_one(f"#{f}", Input).value for f in ("target", "who", "port")}
    values["duration"] = screen.query_one("#duration", Input).value
    values["action"] = str(screen.query_one("#action", Select).value)
    values["proto"] = str(screen.query_one("#proto", Select).value)
    return values


# -- the prompt ------------------------------------------------------------------------------


async def test_a_prompt_pops_up_and_single_keys_answer_it(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        gateway.open_prompt("phone", "api.example.com", "10.78.0.5", 443, waiting=2)
        await until(lambda: on_prompt(app, "p1"), "the prompt to pop up")
        await pilot.pause()
        text = screen_text(app)
        assert "phone → api.example.com:443 (TLS, first contact)" in text
        assert "2 flows held · 30 s left, then deny" in text
        assert "domain example.com" in text
        gateway.clock.advance(12)  # the countdown follows the clock
        await until(lambda: "18 s left, then deny" in screen_text(app), "the countdown")
        # allow · this domain · 1 hour: four keys.
        await pilot.press("a", "3", "o", "enter")
        await until(lambda: isinstance(app.screen, DashboardScreen), "the queue to empty")
        assert ("answer_prompt", "p1", "allow", "1h", "domain", "console") in gateway.calls
        # The fake made the domain's rules, as the gateway does.
        assert {v.rule.target.text for v in gateway.rules() if v.rule.note == "prompt p1"} == {
            "*.example.com",
            "example.com",
        }
        assert "prompt" not in screen_text(app)


async def test_enter_alone_never_answers_and_defaults_are_decides(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        gateway.open_prompt("phone", None, "192.0.2.80", 8080, route="relay")
        await until(lambda: on_prompt(app, "p1"), "the prompt")
        await pilot.press("enter")
        await pilot.pause()
        assert "Choose a (allow) or d (deny) first." in screen_text(app)
        assert not [c for c in gateway.calls if c[0] == "answer_prompt"]
        await pilot.press("o")  # an IP has no domain: the key does nothing
        await pilot.press("d", "enter")
        await until(lambda: isinstance(app.screen, DashboardScreen), "the answer")
        # `unclaw-tui decide`'s defaults: always, this host.
        assert ("answer_prompt", "p1", "deny", "always", "host", "console") in gateway.calls


async def test_the_queue_is_counted_and_later_stops_the_popups(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        for port in (443, 8443, 9443):
            gateway.open_prompt("phone", "api.example.com", "10.78.0.5", port)
        await until(lambda: on_prompt(app, "p1"), "the oldest prompt first")
        await until(lambda: "3 prompts waiting · w" in screen_text(app), "the count")
        assert "Prompt p1 · 1 of 3 · 2 more waiting" in screen_text(app)
        await pilot.press("right")  # browse the queue
        assert on_prompt(app, "p2")
        await pilot.press("left", "d", "1", "p", "enter")
        await until(lambda: on_prompt(app, "p2"), "the next prompt")
        assert ("answer_prompt", "p1", "deny", "once", "port", "console") in gateway.calls
        assert "Prompt p2 · 1 of 2 · 1 more waiting" in screen_text(app)
        await pilot.press("escape")  # later
        await until(lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
        assert "2 prompts waiting · w" in screen_text(app)
        gateway.open_prompt("laptop", "cdn.example.net", "10.78.0.6", 443)
        await until(lambda: "3 prompts waiting" in screen_text(app), "the new one counted")
        assert isinstance(app.screen, DashboardScreen)  # and not popped up: "later" holds
        await pilot.press("w")
        assert on_prompt(app, "p2")


async def test_a_prompt_answered_elsewhere_or_timed_out_leaves_the_queue(
    gateway: FakeGateway,
) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        gateway.open_prompt("phone", "api.example.com", "10.78.0.5", 443)
        gateway.open_prompt("laptop", "cdn.example.net", "10.78.0.6", 443)
        await until(lambda: on_prompt(app, "p1"), "the first prompt")
        gateway.answer_prompt("p1", "allow", "15m", "host", by="cli")  # `unclaw-tui decide`
        await until(lambda: on_prompt(app, "p2"), "the next prompt")
        assert "1 prompt waiting" in screen_text(app)
        gateway.time_out_prompt("p2")
        await until(lambda: isinstance(app.screen, DashboardScreen), "the queue to empty")
        assert "prompt" not in screen_text(app).split("\n")[1]
        assert not [c for c in gateway.calls if c[0] == "answer_prompt" and c[-1] == "console"]


async def test_an_answer_that_lost_the_race_moves_on(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        gateway.open_prompt("phone", "api.example.com", "10.78.0.5", 443)
        gateway.open_prompt("phone", "api.example.com", "10.78.0.5", 8443)
        await until(lambda: on_prompt(app, "p1"), "the prompt")
        answer = gateway.answer_prompt

        def too_late(prompt_id: str, *args: str, **kwargs: str) -> str | None:
            # Timed out in the gateway just now, its event not read yet by the console.
            gateway._prompts.pop(prompt_id, None)
            return answer(prompt_id, *args, **kwargs)

        gateway.answer_prompt = too_late  # type: ignore[method-assign]
        await pilot.press("a", "enter")
        await until(lambda: on_prompt(app, "p2"), "the next prompt")
        assert ("answer_prompt", "p1", "allow", "always", "host", "console") in gateway.calls


async def test_prompts_whose_events_were_lost_come_from_the_gateway(
    gateway: FakeGateway,
) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        gateway.open_prompt("phone", "api.example.com", "10.78.0.5", 443, publish=False)
        app.take_snapshot()  # its prompts_open says 1, the console knows of none
        await until(lambda: on_prompt(app, "p1"), "the prompt from gateway.prompts()")


async def test_a_prompt_does_not_pop_up_over_a_form(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("r", "n")
        assert isinstance(app.screen, RuleFormScreen)
        gateway.open_prompt("phone", "api.example.com", "10.78.0.5", 443)
        await until(lambda: len(app.model.prompts) == 1, "the prompt in the queue")
        await pilot.press(*"abc")  # typing goes on in the form
        assert isinstance(app.screen, RuleFormScreen)
        assert app.screen.query_one("#target", Input).value == "abc"
        await pilot.press("escape")  # back on the Rules screen: w opens the queue
        assert isinstance(app.screen, RulesScreen)
        await pilot.press("w")
        assert on_prompt(app, "p1")


# -- the Rules screen --------------------------------------------------------------------------


async def test_rules_screen_lists_rules_with_hits_and_expiry(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("r")
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        table = screen.table
        await until(lambda: table.row_count == 4, "the rules")
        assert table.shown_keys() == ["b1", "r1", "r2", "r3"]
        row = {c: table.cell_text("r2", c) for c, _ in table.COLUMNS}
        assert row == {
            "id": "r2",
            "action": "allow",
            "target": "*.example.com",
            "who": "phone",
            "port": "443",
            "proto": "tcp",
            "until": "50 min left",
            "hits": "12",
            "last": "28 s ago",
            "note": "prompt p1",
        }
        assert table.cell_text("r3", "until") == "until restart"
        assert table.cell_text("b1", "note") == "flag"
        gateway.clock.advance(3000)  # r2's hour is over
        screen.refresh_rules()
        assert table.cell_text("r2", "until") == "expired"
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)


async def test_a_long_rule_list_goes_in_by_chunks(gateway: FakeGateway) -> None:
    now = gateway.clock()
    for i in range(1_500):
        gateway.put_rule(make_rule("deny", f"h{i}.example.com", now=now, rule_id=f"x{i}"))
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        screen = RulesScreen(gateway, gateway.clock)  # type: ignore[arg-type]
        await app.push_screen(screen)
        table = screen.table
        assert 0 < table.row_count < 1_504  # a first screenful at once, not all
        gateway.remove_rule("x1400")  # a change while the rest goes in
        screen.refresh_rules()
        await until(lambda: table.row_count == 1_503, "every rule", timeout=20)
        assert table.shown_keys() == [view.rule.id for view in gateway.rules()]
        assert "Rules: 1503 (1 built-in" in screen_text(app)


async def test_rules_screen_removes_a_rule_after_asking(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("r")
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        await pilot.press("d")  # b1, built in: a flag, not removable here
        assert app.screen is screen
        assert not [c for c in gateway.calls if c[0] == "remove_rule"]
        await pilot.press("down", "d")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Remove rule r1?" in screen_text(app)
        await pilot.press("n")
        assert not [c for c in gateway.calls if c[0] == "remove_rule"]
        await pilot.press("d", "y")
        await until(lambda: "r1" not in screen.table.shown_keys(), "the row to go")
        assert ("remove_rule", "r1", "console") in gateway.calls


async def test_rules_screen_adds_a_rule_and_shows_errors_inline(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("r", "n")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        await pilot.press(*"bad*x")
        form.query_one("#port", Input).value = "99999"
        form.query_one("#duration", Input).value = "soon"
        await pilot.press("enter")
        await pilot.pause()
        errors = form.field_errors()
        assert "the only wildcard is a leading '*.'" in errors["target"]
        assert "ports are 1..65535" in errors["port"]
        assert "invalid duration 'soon'" in errors["duration"]
        assert "who" not in errors
        assert "the only wildcard" in screen_text(app)
        assert not [c for c in gateway.calls if c[0] == "add_rule"]
        form.query_one("#target", Input).value = "*.example.net"
        form.query_one("#port", Input).value = "443"
        form.query_one("#duration", Input).value = "15m"
        form.query_one("#who", Input).value = "laptop"
        form.query_one("#note", Input).value = "cdn"
        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, RulesScreen), "the form to close")
        [added] = [v for v in gateway.rules() if v.rule.target.text == "*.example.net"]
        rule = added.rule
        assert ("add_rule", rule.id, "console") in gateway.calls
        assert (rule.action.value, rule.who, str(rule.ports), rule.note) == (
            "deny",
            "laptop",
            "443",
            "cdn",
        )
        assert rule.lifetime is Lifetime.TIMED
        assert rule.expires == gateway.clock() + 900
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        await until(lambda: rule.id in screen.table.shown_keys(), "the new row")
        assert screen.table.cell_text(rule.id, "until") == "15 min left"


async def test_a_gateway_refusal_stays_in_the_form(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("r", "n", *"example.org")
        form = app.screen
        assert isinstance(form, RuleFormScreen)

        def refuse(rule: object, by: str = "console") -> object:
            raise ValueError("the rules file is being rewritten, try again")

        form._submit = refuse
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is form
        assert "try again" in screen_text(app)


async def test_editing_a_rule_keeps_its_id_and_expiry(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("r")
        before = next(v.rule for v in gateway.rules() if v.rule.id == "r2")
        await pilot.press("down", "down", "e")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        assert form_values(form) == {
            "target": "*.example.com",
            "who": "phone",
            "port": "443",
            "duration": "50m",
            "action": "allow",
            "proto": "tcp",
        }
        form.query_one("#port", Input).value = "443-444"
        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, RulesScreen), "the form to close")
        calls = [c for c in gateway.calls if c[0] in ("remove_rule", "add_rule")]
        assert calls == [("remove_rule", "r2", "console"), ("add_rule", "r2", "console")]
        after = next(v.rule for v in gateway.rules() if v.rule.id == "r2")
        assert str(after.ports) == "443-444"
        assert (after.expires, after.created) == (before.expires, before.created)


# -- rule from this row, the verdict column, the peer's policy --------------------------------


async def test_rule_from_a_connections_row(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("tab")
        connections = app.dashboard.connections
        assert app.focused is connections
        connections.move_cursor(row=connections.get_row_index("t1"))
        await pilot.press("n")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        assert form_values(form) == {
            "target": "api.example.com",
            "who": "phone",
            "port": "443",
            "duration": "always",
            "action": "deny",  # the flow was allowed: the rule that changes it denies
            "proto": "tcp",
        }
        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, DashboardScreen), "the form to close")
        [made] = [v.rule for v in gateway.rules() if v.rule.target.text == "api.example.com"]
        assert (made.action.value, made.who, str(made.ports), made.proto.value) == (
            "deny",
            "phone",
            "443",
            "tcp",
        )
        # A flow that was denied (and has no hostname on a relay route: its IP) gives allow.
        connections.move_cursor(row=connections.get_row_index("t6"))
        await pilot.press("n")
        assert form_values(app.screen)["action"] == "allow"  # type: ignore[arg-type]


async def test_rule_from_a_dns_and_a_tls_hosts_row(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("tab", "tab")
        dns = app.dashboard.dns
        assert app.focused is dns
        dns.move_cursor(row=dns.get_row_index("q3"))
        await pilot.press("n")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        # A name: any port, any protocol (a deny of it answers NXDOMAIN).
        assert form_values(form) == {
            "target": "nope.invalid",
            "who": "laptop",
            "port": "any",
            "duration": "always",
            "action": "deny",
            "proto": "any",
        }
        await pilot.press("escape")
        await pilot.press("tab")
        tls = app.dashboard.tls
        assert app.focused is tls
        tls.move_cursor(row=tls.get_row_index("tracker.example"))
        await pilot.press("n")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        values = form_values(form)
        assert (values["target"], values["who"], values["port"], values["proto"]) == (
            "tracker.example",
            "laptop",
            "443",
            "tcp",
        )


async def test_the_verdict_and_rule_of_each_flow(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        connections = app.dashboard.connections
        assert connections.cell_text("t1", "verdict") == "allow r2"
        assert connections.cell_text("t2", "verdict") == "allow default"
        assert connections.cell_text("t6", "verdict") == "deny r1"
        phone = gateway.peers["phone"]
        flow = {
            "conn_id": 40,
            "peer": "phone",
            "peer_public_key": phone.public_key,
            "peer_ip": phone.ip,
            "dst_ip": "10.78.0.5",
            "dst_port": 443,
            "hostname": "api.example.com",
            "route": "tls",
        }
        gateway.publish(ev.TcpOpened(ts=gateway.clock(), verdict="ask", **flow))  # type: ignore[arg-type]
        await until(lambda: "t40" in connections.shown_keys(), "the held flow")
        assert connections.cell_text("t40", "verdict") == "ask"
        assert str(connections.get_cell("t40", "verdict").style) == "bold yellow"
        gateway.publish(
            ev.TcpClosed(ts=gateway.clock(), verdict="deny", rule="r9", error="denied", **flow)  # type: ignore[arg-type]
        )
        await until(lambda: connections.cell_text("t40", "verdict") == "deny r9", "the answer")


async def test_a_peers_policy_is_shown_and_changed(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        peers = app.dashboard.peers
        assert peers.cell_text(fake_key("phone"), "policy") == "ask→deny"
        assert peers.cell_text(fake_key("laptop"), "policy") == "allow"
        assert peers.cell_text(fake_key("vm-build"), "policy") == "deny"
        await pilot.press("down", "e")  # laptop
        assert isinstance(app.screen, PeerPolicyScreen)
        await pilot.press("escape")
        assert not [c for c in gateway.calls if c[0] == "set_peer_policy"]
        await pilot.press("e", "k", "f", "enter")
        assert ("set_peer_policy", "laptop", "ask", "allow") in gateway.calls
        await until(
            lambda: peers.cell_text(fake_key("laptop"), "policy") == "ask→allow", "the new policy"
        )
