//! Every validation rule, one row each: the object is rejected (or warned about) at the exact
//! field path with the reason.

use sluice_translator::diagnostic::{Diagnostic, Severity};
use sluice_translator::parse::parse_documents;

const NET: &str = "networking.istio.io/v1";
const SEC: &str = "security.istio.io/v1";

fn doc(api: &str, kind: &str, body: &str) -> String {
    format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x, namespace: ns}}\n{body}\n")
}

/// The objects accepted (a rejected AuthorizationPolicy's fail-closed stand-in is not one) and
/// the diagnostics.
fn diagnostics(text: &str) -> (usize, Vec<Diagnostic>) {
    let (objects, diags) = parse_documents("case.yaml", text);
    (objects.iter().filter(|o| !o.stand_in).count(), diags)
}

/// Asserts the document is rejected with a diagnostic at `path` containing `reason`.
fn rejected(text: &str, path: &str, reason: &str) {
    let (accepted, diags) = diagnostics(text);
    assert_eq!(accepted, 0, "expected rejection of:\n{text}\n{diags:#?}");
    assert!(
        diags.iter().any(|d| d.severity == Severity::Error && d.path == path && d.message.contains(reason)),
        "no error at {path:?} containing {reason:?} for:\n{text}\ngot: {:#?}",
        diags.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
}

/// Asserts the document is accepted with a warning at `path` containing `reason`.
fn warned(text: &str, path: &str, reason: &str) {
    let (accepted, diags) = diagnostics(text);
    assert_eq!(accepted, 1, "expected acceptance of:\n{text}\n{diags:#?}");
    assert!(
        diags.iter().any(|d| d.severity == Severity::Warning && d.path == path && d.message.contains(reason)),
        "no warning at {path:?} containing {reason:?}: {diags:#?}"
    );
}

fn vs(http: &str) -> String {
    doc(NET, "VirtualService", &format!("spec:\n  hosts: [a]\n  http:\n{http}"))
}

#[test]
fn virtual_service_rules() {
    let two = |w1: i64, w2: i64| {
        vs(&format!(
            "  - route:\n    - {{destination: {{host: a, subset: v1}}, weight: {w1}}}\n    - {{destination: {{host: a, subset: v2}}, weight: {w2}}}\n"
        ))
    };
    rejected(&two(50, 40), "spec.http[0].route", "sum to 90");
    rejected(&two(110, -10), "spec.http[0].route[1].weight", "negative");
    rejected(
        &vs("  - match: [{uri: {regex: \"[\"}}]\n    route: [{destination: {host: a}}]\n"),
        "spec.http[0].match[0].uri.regex",
        "RE2",
    );
    rejected(
        &vs("  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: a}}]\n"),
        "spec.http[0].match[0].uri",
        "exactly one",
    );
    rejected(
        &vs("  - match: [{headers: {X-Upper: {exact: a}}}]\n    route: [{destination: {host: a}}]\n"),
        "spec.http[0].match[0].headers.X-Upper",
        "lowercase",
    );
    rejected(
        &vs("  - match: [{queryParams: {q: {}}}]\n    route: [{destination: {host: a}}]\n"),
        "spec.http[0].match[0].queryParams.q",
        "exactly one",
    );
    rejected(
        &vs("  - route: [{destination: {host: \"a b\"}}]\n"),
        "spec.http[0].route[0].destination.host",
        "not a valid DNS name",
    );
    rejected(
        &vs("  - route: [{destination: {host: a, port: {number: 0}}}]\n"),
        "spec.http[0].route[0].destination.port.number",
        "out of range",
    );
    rejected(&vs("  - timeout: 5s\n"), "spec.http[0]", "one of route, redirect");
    rejected(&vs("  - route: [{destination: {host: a}}]\n    redirect: {uri: /b}\n"), "spec.http[0]", "only one of");
    rejected(&vs("  - redirect: {uri: /b}\n    rewrite: {uri: /c}\n"), "spec.http[0].rewrite", "redirect");
    rejected(
        &vs("  - redirect: {uri: /b, redirectCode: 200}\n"),
        "spec.http[0].redirect.redirectCode",
        "not a redirect",
    );
    rejected(&vs("  - redirect: {}\n"), "spec.http[0].redirect", "at least one");
    rejected(&vs("  - directResponse: {status: 99}\n"), "spec.http[0].directResponse.status", "between 200 and 599");
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    retries: {attempts: 2, retryOn: \"5xx,sometimes\"}\n"),
        "spec.http[0].retries.retryOn",
        "\"sometimes\"",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    retries: {attempts: -1}\n"),
        "spec.http[0].retries.attempts",
        "negative",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    fault: {abort: {httpStatus: 500, percentage: {value: 150}}}\n"),
        "spec.http[0].fault.abort.percentage.value",
        "between 0 and 100",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    fault: {abort: {percentage: {value: 5}}}\n"),
        "spec.http[0].fault.abort",
        "httpStatus or grpcStatus",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    fault: {delay: {percentage: {value: 5}}}\n"),
        "spec.http[0].fault.delay.fixedDelay",
        "required",
    );
    rejected(&vs("  - route: [{destination: {host: a}}]\n    fault: {}\n"), "spec.http[0].fault", "delay or abort");
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    mirror: {host: b}\n    mirrors: [{destination: {host: c}}]\n"),
        "spec.http[0].mirrors",
        "cannot both",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    mirrorPercentage: {value: 101}\n"),
        "spec.http[0].mirrorPercentage.value",
        "between 0 and 100",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    corsPolicy: {allowMethods: [FETCH]}\n"),
        "spec.http[0].corsPolicy.allowMethods[0]",
        "not an HTTP method",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    rewrite: {uriRegexRewrite: {match: \"(\", rewrite: x}}\n"),
        "spec.http[0].rewrite.uriRegexRewrite.match",
        "RE2",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    timeout: 5 seconds\n"),
        "spec.http[0].timeout",
        "unknown unit",
    );
    rejected(
        &doc(NET, "VirtualService", "spec:\n  hosts: [\"*\"]\n  http: [{route: [{destination: {host: a}}]}]"),
        "spec.hosts",
        "only allowed when",
    );
    rejected(
        &doc(NET, "VirtualService", "spec:\n  hosts: []\n  http: [{route: [{destination: {host: a}}]}]"),
        "spec.hosts",
        "at least one host",
    );
    rejected(&doc(NET, "VirtualService", "spec:\n  hosts: [a]"), "spec", "at least one of http, tcp or tls");
    rejected(
        &doc(
            NET,
            "VirtualService",
            "spec:\n  hosts: [a]\n  exportTo: [\"*\", \".\"]\n  http: [{route: [{destination: {host: a}}]}]",
        ),
        "spec.exportTo",
        "cannot be combined",
    );
    rejected(
        &doc(
            NET,
            "VirtualService",
            "spec:\n  hosts: [a]\n  tcp: [{match: [{destinationSubnets: [nope]}], route: [{destination: {host: a}}]}]",
        ),
        "spec.tcp[0].match[0].destinationSubnets[0]",
        "not an IP or CIDR",
    );
    rejected(
        &doc(NET, "VirtualService", "spec:\n  hosts: [a]\n  tcp: [{route: []}]"),
        "spec.tcp[0].route",
        "at least one destination",
    );
    warned(&vs("  - delegate: {name: b}\n"), "spec.http[0].delegate", "not supported");
}

fn dr(spec: &str) -> String {
    doc(NET, "DestinationRule", &format!("spec:\n  host: a\n{spec}"))
}

#[test]
fn destination_rule_rules() {
    rejected(&doc(NET, "DestinationRule", "spec: {}"), "spec.host", "required");
    rejected(&dr("  subsets: [{name: v1}, {name: v1}]"), "spec.subsets[1].name", "duplicate");
    rejected(&dr("  subsets: [{name: V_1}]"), "spec.subsets[0].name", "DNS-1123");
    rejected(
        &dr("  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}"),
        "spec.trafficPolicy.loadBalancer",
        "only one of simple",
    );
    rejected(
        &dr("  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}"),
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "exactly one",
    );
    rejected(
        &dr("  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {ttl: 1s}}}}"),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
        "required",
    );
    rejected(
        &dr("  trafficPolicy: {loadBalancer: {simple: FAST}}"),
        "spec.trafficPolicy.loadBalancer.simple",
        "unknown variant `FAST`",
    );
    rejected(
        &dr("  trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}"),
        "spec.trafficPolicy.connectionPool.tcp.maxConnections",
        "must not be negative",
    );
    rejected(
        &dr("  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: SOMETIMES}}}"),
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
        "not one of",
    );
    rejected(
        &dr("  trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}"),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "between 0 and 100",
    );
    rejected(
        &dr("  trafficPolicy: {outlierDetection: {consecutive5xxErrors: -2}}"),
        "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
        "invalid value: integer `-2`, expected u32",
    );
    rejected(
        &dr("  trafficPolicy: {portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]}"),
        "spec.trafficPolicy.portLevelSettings[1].port.number",
        "duplicate",
    );
    rejected(
        &dr("  trafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}"),
        "spec.trafficPolicy.portLevelSettings[0].port",
        "required",
    );
    rejected(
        &dr("  subsets: [{name: v1, trafficPolicy: {loadBalancer: {consistentHash: {}}}}]"),
        "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash",
        "exactly one",
    );
    rejected(
        &dr("  trafficPolicy: {tls: {mode: ISTIO_MUTUAL, caCertificates: /ca.pem}}"),
        "spec.trafficPolicy.tls.caCertificates",
        "ISTIO_MUTUAL uses the workload's own certificate",
    );
    rejected(
        &dr(
            "  trafficPolicy: {portLevelSettings: [{port: {number: 80}, tls: {mode: MUTUAL, clientCertificate: /c.pem}}]}",
        ),
        "spec.trafficPolicy.portLevelSettings[0].tls.privateKey",
        "needs a client certificate and a private key",
    );
    warned(
        &dr("  trafficPolicy: {tls: {mode: SIMPLE, credentialName: cart-tls}}"),
        "spec.trafficPolicy.tls.credentialName",
        "connections to this destination are refused",
    );
}

fn se(spec: &str) -> String {
    doc(NET, "ServiceEntry", spec)
}

#[test]
fn service_entry_and_workload_entry_rules() {
    // As Istio: ports are optional; port names are DNS-1123 labels; a WorkloadEntry without an
    // address is a warning when it names a network; Unix socket addresses are absolute file
    // paths (or abstract) and carry no ports.
    let (accepted, diags) = diagnostics(&se("spec: {hosts: [a.com]}"));
    assert_eq!(accepted, 1, "a ServiceEntry without ports: {diags:?}");
    rejected(&se("spec: {hosts: [a.com], ports: [{number: 80, name: Http_1}]}"), "spec.ports[0].name", "DNS-1123");
    let we = |body: &str| doc(NET, "WorkloadEntry", body);
    warned(&we("spec: {network: net-2}"), "spec.address", "unset with network");
    rejected(&we("spec: {labels: {app: a}}"), "spec.address", "address is required");
    for relative in ["unix://relative.sock", "unix:///var/run/", "unix://"] {
        rejected(&we(&format!("spec: {{address: \"{relative}\"}}")), "spec.address", "absolute path");
    }
    rejected(
        &we("spec: {address: \"unix:///var/run/a.sock\", ports: {http: 80}}"),
        "spec.ports",
        "must not include ports",
    );
    assert_eq!(diagnostics(&we("spec: {address: \"unix:///var/run/a.sock\"}")).0, 1);
    assert_eq!(diagnostics(&we("spec: {address: \"unix://@abstract\"}")).0, 1);
    rejected(&we("spec: {address: 1.2.3.4, ports: {Bad_Name: 80}}"), "spec.ports.Bad_Name", "DNS-1123");
    rejected(
        &se("spec: {hosts: [a.com], ports: [{number: 80, name: http}, {number: 81, name: http}]}"),
        "spec.ports[1].name",
        "duplicate port name",
    );
    rejected(
        &se("spec: {hosts: [a.com], ports: [{number: 80, name: a}, {number: 80, name: b}]}"),
        "spec.ports[1].number",
        "duplicate port number",
    );
    rejected(&se("spec: {hosts: [a.com], ports: [{number: 80}]}"), "spec.ports[0].name", "required");
    rejected(
        &se("spec: {hosts: [\"*\"], ports: [{number: 80, name: a}]}"),
        "spec.hosts[0]",
        "not allowed in a ServiceEntry",
    );
    rejected(
        &se("spec: {hosts: [a.com], addresses: [300.1.1.1], ports: [{number: 80, name: a}]}"),
        "spec.addresses[0]",
        "not an IP",
    );
    rejected(
        &se("spec: {hosts: [a.com], ports: [{number: 80, name: a}], endpoints: [{address: 127.0.0.1}]}"),
        "spec.endpoints",
        "resolution STATIC or DNS",
    );
    rejected(
        &se(
            "spec: {hosts: [a.com], ports: [{number: 80, name: a}], resolution: STATIC, endpoints: [{address: a.com}]}",
        ),
        "spec.endpoints[0].address",
        "must be an IP",
    );
    rejected(
        &se(
            "spec: {hosts: [a.com], ports: [{number: 80, name: a}], resolution: STATIC, endpoints: [{address: 127.0.0.1, ports: {b: 90}}]}",
        ),
        "spec.endpoints[0].ports.b",
        "no port named",
    );
    rejected(
        &se("spec: {hosts: [\"*.a.com\"], ports: [{number: 80, name: a}], resolution: DNS}"),
        "spec.hosts",
        "without wildcards",
    );
    rejected(
        &se(
            "spec: {hosts: [a.com], ports: [{number: 80, name: a}], resolution: STATIC, workloadSelector: {labels: {a: b}}, endpoints: [{address: 127.0.0.1}]}",
        ),
        "spec.workloadSelector",
        "cannot both",
    );
    rejected(
        &se("spec: {hosts: [a.com], ports: [{number: 80, name: a}], resolution: MAGIC}"),
        "spec.resolution",
        "unknown variant",
    );
    rejected(
        &doc(NET, "WorkloadEntry", "spec: {address: 127.0.0.1, locality: a//b}"),
        "spec.locality",
        "region/zone/subzone",
    );
    rejected(&doc(NET, "WorkloadEntry", "spec: {address: \"\"}"), "spec.address", "required");
    rejected(
        &doc(NET, "WorkloadEntry", "spec: {address: 127.0.0.1, ports: {http: 0}}"),
        "spec.ports.http",
        "out of range",
    );
    warned(
        &se("spec: {hosts: [a.com], ports: [{number: 80, name: a}], resolution: STATIC}"),
        "spec.endpoints",
        "no endpoints",
    );
}

fn sidecar(spec: &str) -> String {
    doc(NET, "Sidecar", spec)
}

#[test]
fn sidecar_rules() {
    rejected(&sidecar("spec: {egress: [{hosts: [nohost]}]}"), "spec.egress[0].hosts[0]", "namespace/host");
    rejected(&sidecar("spec: {egress: [{hosts: [\"Bad_NS/*\"]}]}"), "spec.egress[0].hosts[0]", "namespace");
    rejected(&sidecar("spec: {egress: [{hosts: []}]}"), "spec.egress[0].hosts", "at least one");
    rejected(
        &sidecar("spec: {egress: [{hosts: [\"./*\"]}, {port: {number: 80}, hosts: [\"./*\"]}]}"),
        "spec.egress",
        "must be the last",
    );
    rejected(
        &sidecar("spec: {egress: [{hosts: [\"./*\"]}, {hosts: [\"*/*\"]}]}"),
        "spec.egress",
        "only one egress listener",
    );
    rejected(&sidecar("spec: {egress: [{bind: 127.0.0.1, hosts: [\"./*\"]}]}"), "spec.egress[0]", "need a port");
    rejected(
        &sidecar("spec: {egress: [{port: {number: 80}, bind: localhost, hosts: [\"./*\"]}]}"),
        "spec.egress[0].bind",
        "IP address",
    );
    rejected(
        &sidecar("spec: {ingress: [{port: {number: 80}, defaultEndpoint: \"127.0.0.1\"}]}"),
        "spec.ingress[0].defaultEndpoint",
        "IP:PORT",
    );
    rejected(
        &sidecar("spec: {ingress: [{port: {number: 80, protocol: SMTP}}]}"),
        "spec.ingress[0].port.protocol",
        "unknown protocol",
    );
    rejected(
        &sidecar("spec: {ingress: [{port: {number: 80}}, {port: {number: 80}}]}"),
        "spec.ingress[1].port",
        "duplicate",
    );
    rejected(
        &sidecar("spec: {ingress: [{port: {number: 80}, captureMode: SOMETIMES}]}"),
        "spec.ingress[0].captureMode",
        "unknown variant",
    );
}

fn ap(spec: &str) -> String {
    doc(SEC, "AuthorizationPolicy", spec)
}

#[test]
fn authorization_policy_rules() {
    rejected(&ap("spec: {action: CUSTOM}"), "spec.provider", "needs a provider");
    rejected(&ap("spec: {action: DENY, provider: {name: x}}"), "spec.provider", "only allowed with action CUSTOM");
    rejected(&ap("spec: {rules: [{from: [{}]}]}"), "spec.rules[0].from[0].source", "required");
    rejected(&ap("spec: {rules: [{to: [{operation: {}}]}]}"), "spec.rules[0].to[0].operation", "at least one field");
    rejected(
        &ap("spec: {rules: [{from: [{source: {principals: [a], serviceAccounts: [b]}}]}]}"),
        "spec.rules[0].from[0].source",
        "cannot be combined",
    );
    rejected(
        &ap("spec: {rules: [{from: [{source: {ipBlocks: [1.2.3.4/40]}}]}]}"),
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "not an IP",
    );
    rejected(
        &ap("spec: {rules: [{from: [{source: {principals: [\"a*b*c\"]}}]}]}"),
        "spec.rules[0].from[0].source.principals[0]",
        "only allowed at the start or end",
    );
    rejected(
        &ap("spec: {rules: [{to: [{operation: {ports: [\"99999\"]}}]}]}"),
        "spec.rules[0].to[0].operation.ports[0]",
        "not a port",
    );
    rejected(&ap("spec: {rules: [{when: [{key: source.ip}]}]}"), "spec.rules[0].when[0]", "values or notValues");
    rejected(
        &ap("spec: {rules: [{when: [{key: source.ip, values: [x]}]}]}"),
        "spec.rules[0].when[0].values[0]",
        "not an IP",
    );
    rejected(
        &ap("spec: {rules: [{when: [{key: destination.port, values: [\"0\"]}]}]}"),
        "spec.rules[0].when[0].values[0]",
        "not a port",
    );
    rejected(
        &ap("spec: {rules: [{when: [{key: \"request.headers[]\", values: [a]}]}]}"),
        "spec.rules[0].when[0].key",
        "unknown attribute",
    );
    rejected(&ap("spec: {targetRefs: [{kind: Gateway, name: g}]}"), "spec.targetRefs", "not supported");
    warned(
        &ap("spec: {rules: [{to: [{operation: {methods: [get]}}]}]}"),
        "spec.rules[0].to[0].operation.methods[0]",
        "not a standard",
    );
    let dry_run = |value: &str, action: &str| {
        format!(
            "apiVersion: {SEC}\nkind: AuthorizationPolicy\nmetadata: {{name: x, namespace: ns, annotations: \
             {{istio.io/dry-run: \"{value}\"}}}}\nspec: {{action: {action}, rules: [{{}}]}}\n"
        )
    };
    rejected(&dry_run("maybe", "DENY"), "metadata.annotations.istio.io/dry-run", "\"maybe\" is not a boolean");
    rejected(&dry_run("true", "AUDIT"), "metadata.annotations.istio.io/dry-run", "only supported on ALLOW and DENY");
    assert_eq!(diagnostics(&dry_run("True", "ALLOW")).1, vec![], "Go's booleans");
    rejected(
        &doc(SEC, "PeerAuthentication", "spec: {portLevelMtls: {80: {mode: STRICT}}}"),
        "spec.portLevelMtls",
        "requires a workload selector",
    );
}

#[test]
fn kubernetes_and_metadata_rules() {
    let svc =
        |spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec: {spec}\n");
    rejected(&svc("{ports: [{port: 80}, {port: 81, name: b}]}"), "spec.ports[0].name", "must be named");
    rejected(&svc("{ports: [{name: a, port: 70000}]}"), "spec.ports[0].port", "out of range");
    rejected(&svc("{clusterIP: nope, ports: [{name: a, port: 80}]}"), "spec.clusterIP", "not an IP");
    warned(&svc("{ports: [{name: web, port: 80}]}"), "spec.ports[0].name", "treats it as TCP");
    let slice = |labels: &str, body: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e, namespace: ns{labels}}}\n{body}\n"
        )
    };
    rejected(&slice("", "addressType: IPv4\nendpoints: []"), "metadata.labels.kubernetes.io/service-name", "required");
    rejected(
        &slice(", labels: {kubernetes.io/service-name: s}", "addressType: IPv4\nendpoints: [{addresses: [\"::1\"]}]"),
        "endpoints[0].addresses[0]",
        "not an IPv4",
    );
    rejected(
        &slice(", labels: {kubernetes.io/service-name: s}", "addressType: Carrier"),
        "addressType",
        "not IPv4, IPv6 or FQDN",
    );
    rejected(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\nstatus: {podIP: nope}\n",
        "status.podIP",
        "not an IP",
    );
    rejected(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {sluice.io/dataplane: warp}}\nspec: {containers: [{name: c}]}\n",
        "metadata.labels.sluice.io/dataplane",
        "not a data-plane mode",
    );
    rejected(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: none}\n",
        "spec.containers",
        "invalid type",
    );
    rejected(&doc(NET, "Sidecar", "spec: {}").replace("name: x", "name: Bad_Name"), "metadata.name", "DNS-1123");
    rejected(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {namespace: a}\nspec: {}\n",
        "metadata.name",
        "required",
    );
    rejected("kind: Sidecar\nmetadata: {name: a}\n", "document 0", "apiVersion and kind are required");
    rejected("- just\n- a list\n", "document 0", "mapping");
}

#[test]
fn unknown_kinds_are_skipped_with_a_warning_and_lists_are_read() {
    let (n, d) = diagnostics("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n");
    assert_eq!(n, 0);
    assert!(d[0].severity == Severity::Warning && d[0].message.contains("not read by sluice"));
    let (n, d) = diagnostics(&format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
        "{apiVersion: v1, kind: Namespace, metadata: {name: a}}",
        "{apiVersion: v1, kind: Namespace, metadata: {name: b}}"
    ));
    assert_eq!((n, d.len()), (2, 0));
    let (n, _) = diagnostics("---\n# only a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n");
    assert_eq!(n, 1, "empty documents are skipped");
}

/// What passes validation must also encode and be accepted by Envoy: numbers within the range of
/// the field they become, Envoy's own bounds, and regexes within the RE2 program size the
/// bootstrap allows. Each of these once passed validation and froze every proxy.
#[test]
fn values_fit_the_fields_they_become() {
    let max = i64::MAX;
    rejected(
        &vs(&format!(
            "  - route:\n    - {{destination: {{host: a, subset: v1}}, weight: {max}}}\n    - {{destination: {{host: a, subset: v2}}, weight: {max}}}\n    - {{destination: {{host: a, subset: v3}}, weight: 102}}\n"
        )),
        "spec.http[0].route[0].weight",
        "expected i32",
    );
    rejected(
        &dr("  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 99999999999}}"),
        "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
        "expected u32",
    );
    rejected(
        &dr("  trafficPolicy: {connectionPool: {http: {maxRetries: 4294967296}}}"),
        "spec.trafficPolicy.connectionPool.http.maxRetries",
        "expected i32",
    );
    rejected(
        &vs("  - route: [{destination: {host: a}}]\n    timeout: 99999999999999999s\n"),
        "spec.http[0].timeout",
        "protobuf durations end at 315576000000s",
    );
    let ok = vs("  - route: [{destination: {host: a}}]\n    timeout: 315576000000s\n");
    assert_eq!(diagnostics(&ok).0, 1, "the largest protobuf duration is valid");
    rejected(
        &dr(
            "  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x, minimumRingSize: 18446744073709551615}\n",
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
        "8388608",
    );
    rejected(
        &dr(
            "  trafficPolicy:\n    loadBalancer:\n      consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 8388609}}\n",
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize",
        "8388608",
    );
    rejected(
        &dr(
            "  trafficPolicy:\n    loadBalancer:\n      consistentHash: {useSourceIp: true, maglev: {tableSize: 5000011}}\n",
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "5000011",
    );
    // [a-z]{200} is 204 RE2 instructions: over Envoy's default of 100, within the 32768 the
    // bootstrap sets; [a-z]{40000} is over both.
    let regex =
        |r: &str| vs(&format!("  - match: [{{uri: {{regex: \"{r}\"}}}}]\n    route: [{{destination: {{host: a}}}}]\n"));
    assert_eq!(diagnostics(&regex("[a-z]{200}")).0, 1);
    rejected(&regex("[a-z]{40000}"), "spec.http[0].match[0].uri.regex", "RE2 instructions");
    assert_eq!(sluice_translator::model::common::re2_program_size("[a-z]{200}"), 204, "Envoy reports 204");
}

/// YAML read as Kubernetes reads it: a duplicate key is an error naming the key, so is a number
/// JSON cannot hold; a syntax error rejects its own document only; a hostile nesting is refused
/// before it is parsed.
#[test]
fn yaml_is_read_strictly_and_per_document() {
    let dup = vs("  - route: [{destination: {host: a}}]\n").replace("  hosts: [a]\n", "  hosts: [a]\n  hosts: [b]\n");
    let (accepted, diags) = diagnostics(&dup);
    assert_eq!(accepted, 0);
    assert!(diags[0].message.contains("duplicate key \"hosts\"") && diags[0].message.contains("line"), "{diags:?}");

    let inf = dr("  trafficPolicy: {outlierDetection: {interval: .inf}}");
    let (accepted, diags) = diagnostics(&inf);
    assert_eq!(accepted, 0);
    assert!(diags[0].message.contains("not a number"), "{diags:?}");

    let good = dr("");
    let text = format!("{good}---\napiVersion: v1\nkind: [unclosed\n---\n{}", good.replace("name: x", "name: y"));
    let (accepted, diags) = diagnostics(&text);
    assert_eq!(accepted, 2, "the documents around a broken one are read: {diags:?}");
    assert_eq!(diags.iter().filter(|d| d.severity == Severity::Error).count(), 1);
    assert_eq!(diags[0].path, "document 1");

    let deep = format!("{}x: {}{}\n", good, "[".repeat(100_000), "]".repeat(100_000));
    let (accepted, diags) = diagnostics(&deep);
    assert_eq!(accepted, 0);
    assert!(diags[0].message.contains("nest more than"), "{diags:?}");
    // A sequence where a mapping belongs is a wrong type, not an empty selector (which would
    // select every workload of the namespace).
    rejected(
        &doc(NET, "Sidecar", "spec:\n  workloadSelector: []\n  egress: [{hosts: [\"./*\"]}]"),
        "spec.workloadSelector",
        "expected a mapping, found a sequence",
    );
    rejected(&ap("spec:\n  selector: []\n  action: DENY\n  rules: [{}]"), "spec.selector", "expected a mapping");
    // Brackets in quotes and comments are not nesting.
    let quoted = dr(&format!("  exportTo: [\"{}\"] # {}", "[".repeat(500), "{".repeat(500)));
    assert!(diagnostics(&quoted).1.iter().all(|d| !d.message.contains("nest")), "{:?}", diagnostics(&quoted).1);
}

#[test]
fn a_rejected_authorization_policy_leaves_a_fail_closed_stand_in() {
    use sluice_translator::model::Object;
    use sluice_translator::model::authorization_policy::Action;
    let stand_in = |text: &str| {
        let (objects, diags) = parse_documents("case.yaml", text);
        let warning = diags.iter().find(|d| d.severity == Severity::Warning && d.message.contains("fail closed"));
        let policy = objects.iter().find(|o| o.stand_in).map(|o| match &o.object {
            Object::AuthorizationPolicy(p) => (p.spec.clone(), o.reference.to_string()),
            other => panic!("a stand-in for {other:?}"),
        });
        (policy, warning.map(ToString::to_string))
    };
    // Invalid (a wildcard inside a value): DENY everything on the workloads it selected.
    let (policy, warning) = stand_in(&ap(
        "spec: {selector: {matchLabels: {app: a}}, rules: [{from: [{source: {principals: [\"a*b*c\"]}}]}]}",
    ));
    let (spec, reference) = policy.expect("a stand-in");
    assert_eq!(reference, "AuthorizationPolicy/ns/x");
    assert_eq!((spec.action, spec.rules.len()), (Some(Action::Deny), 1));
    assert!(spec.rules[0].from.is_empty() && spec.rules[0].to.is_empty() && spec.rules[0].when.is_empty());
    assert_eq!(spec.selector.unwrap().match_labels["app"], "a");
    assert!(warning.unwrap().contains("the workloads it selects deny every request"));
    // Not even decodable: the selector, read on its own, still says whom it was for.
    let (policy, _) = stand_in(&ap("spec: {selector: {matchLabels: {app: b}}, rules: 5}"));
    assert_eq!(policy.expect("a stand-in").0.selector.unwrap().match_labels["app"], "b");
    // No selector: the whole namespace.
    let (_, warning) = stand_in(&ap("spec: {rules: [{when: [{key: nonsense, values: [a]}]}]}"));
    assert!(warning.unwrap().contains("every workload of its namespace denies every request"));
    // AUDIT enforces nothing, so a rejected one stands in for nothing.
    assert_eq!(stand_in(&ap("spec: {action: AUDIT, rules: [{when: [{key: nonsense, values: [a]}]}]}")), (None, None));
}

#[test]
fn request_authentication_rules() {
    let ra = |rules: &str| doc(SEC, "RequestAuthentication", &format!("spec: {{jwtRules: {rules}}}"));
    warned(&ra("[{issuer: a}]"), "spec.jwtRules[0].jwksUri", "its tokens are refused (401)");
    rejected(&ra("[{issuer: a, jwks: '{\"keys\": []}'}]"), "spec.jwtRules[0].jwks", "holds no key");
    rejected(&ra("[{issuer: a, jwks: 'keys'}]"), "spec.jwtRules[0].jwks", "not a JSON Web Key Set");
    rejected(&ra("[{issuer: a, jwks: '{\"keys\": [{\"n\": 1}]}'}]"), "spec.jwtRules[0].jwks", "key 0 has no kty");
    rejected(
        &ra("[{issuer: a, jwksUri: 'https://a/k', jwks: '{\"keys\": []}'}]"),
        "spec.jwtRules[0].jwks",
        "cannot both be set",
    );
    rejected(
        &ra("[{issuer: a, jwksUri: 'https://a/k'}, {issuer: a, jwksUri: 'https://b/k'}]"),
        "spec.jwtRules[1].issuer",
        "given twice",
    );
    rejected(&ra("[{jwksUri: 'https://a/k'}]"), "spec.jwtRules[0].issuer", "issuer is required");
    assert_eq!(diagnostics(&ra("[{issuer: a, jwksUri: 'http://127.0.0.9:8080/keys'}]")).1, vec![]);
}

#[test]
fn unknown_fields_of_security_policies_are_refused() {
    // A misspelt `from` would otherwise leave a rule that allows every source.
    rejected(
        &ap("spec: {rules: [{form: [{source: {namespaces: [a]}}], to: [{operation: {methods: [GET]}}]}]}"),
        "spec.rules[0].form",
        "a security policy is refused rather than enforced without it",
    );
    rejected(
        &doc(SEC, "RequestAuthentication", "spec: {jwtRules: [{issuer: a, jwksUri: 'https://a/k', audience: [b]}]}"),
        "spec.jwtRules[0].audience",
        "unknown field",
    );
    // Elsewhere an unknown field is a warning.
    warned(&dr("  tyop: 1"), "spec.tyop", "unknown field, ignored");
}
