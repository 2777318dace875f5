//! Test doubles: a small in-memory Kubernetes API server behind kube's
//! `tower_test::mock` pair (it records every request's method and path, for
//! the RBAC test, and answers get/list/create/patch/replace/delete the way
//! the apiserver would, including resourceVersion preconditions), and fake
//! brokers for the admin API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use keelmq_proto::admin as pb;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use crate::brokers::{AdminError, BrokerAdmin};

/// One request the operator made.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without query.
    pub path: String,
    /// Query string.
    pub query: String,
    /// Content type, if any.
    pub content_type: String,
    /// Body as JSON (Null when empty).
    pub body: Value,
}

impl Recorded {
    /// `(api group, resource[/subresource], verb)` for every verb RBAC
    /// checks for this request: one, except for a server-side apply, which
    /// the API server authorises as `patch` and, when it creates the object,
    /// as `create` too (counted always: any apply may be the first).
    pub fn rbac(&self) -> Vec<(String, String, String)> {
        let t = Target::parse(&self.path).expect("a resource path");
        let resource = match &t.sub {
            Some(s) => format!("{}/{s}", t.resource),
            None => t.resource.clone(),
        };
        let verb = match (self.method.clone(), t.name.is_some()) {
            (Method::GET, true) => "get",
            (Method::GET, false) if self.query.contains("watch=true") => "watch",
            (Method::GET, false) => "list",
            (Method::POST, _) => "create",
            (Method::PATCH, _) => "patch",
            (Method::PUT, _) => "update",
            (Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        let mut verbs = vec![verb];
        if self.method == Method::PATCH && self.content_type.contains("apply-patch") {
            verbs.push("create");
        }
        verbs
            .into_iter()
            .map(|v| (t.group.clone(), resource.clone(), v.to_string()))
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Target {
    group: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match *parts.first()? {
            "api" => (String::new(), parts.get(2..)?),
            "apis" => (parts.get(1)?.to_string(), parts.get(3..)?),
            _ => return None,
        };
        let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
            (Some(rest[1].to_string()), &rest[2..])
        } else {
            (None, rest)
        };
        Some(Target {
            group,
            namespace,
            resource: rest.first()?.to_string(),
            name: rest.get(1).map(|s| s.to_string()),
            sub: rest.get(2).map(|s| s.to_string()),
        })
    }
    fn key(&self, name: &str) -> String {
        format!(
            "{}/{}/{}/{name}",
            self.group,
            self.resource,
            self.namespace.as_deref().unwrap_or("")
        )
    }
}

/// The fake apiserver's state.
#[derive(Default)]
pub struct ApiState {
    objects: BTreeMap<String, Value>,
    /// Every request, in order.
    pub requests: Vec<Recorded>,
    rv: u64,
    /// Answer the next status PUT with 409 Conflict.
    pub conflict_next_status_put: bool,
    /// After answering the next GET of one object, change that object
    /// (a new resourceVersion), as another writer would right after the read.
    pub change_after_next_get: bool,
    /// Answer every server-side apply with 403 Forbidden (an admission
    /// webhook or RBAC refusing it).
    pub refuse_applies: bool,
    /// Never answer writes of Leases (a half-open connection).
    pub hang_lease_writes: bool,
    /// Shared timeline of writes and broker calls.
    pub timeline: Option<Timeline>,
}

/// A shared, ordered log of what happened (API writes, broker calls).
pub type Timeline = Arc<Mutex<Vec<String>>>;

/// Handle on the fake apiserver.
#[derive(Clone)]
pub struct FakeApi {
    /// Its state.
    pub state: Arc<Mutex<ApiState>>,
    /// A client talking to it.
    pub client: Client,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": message, "code": code}),
    )
}

fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn pointer_parent<'a>(doc: &'a mut Value, path: &str) -> Option<(&'a mut Value, String)> {
    let (parent, last) = path.rsplit_once('/')?;
    let last = last.replace("~1", "/").replace("~0", "~");
    let p = if parent.is_empty() {
        Some(doc)
    } else {
        doc.pointer_mut(parent)
    }?;
    Some((p, last))
}

fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("json patch is not an array")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        match op["op"].as_str() {
            Some("test") => {
                let found = doc.pointer(path).cloned().unwrap_or(Value::Null);
                if found != op["value"] {
                    return Err(format!("test failed at {path}"));
                }
            }
            Some("add") | Some("replace") => {
                let (parent, last) = pointer_parent(doc, path).ok_or("bad path")?;
                match parent {
                    Value::Array(a) if last == "-" => a.push(op["value"].clone()),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if op["op"] == "add" {
                            a.insert(i.min(a.len()), op["value"].clone());
                        } else if i < a.len() {
                            a[i] = op["value"].clone();
                        }
                    }
                    Value::Object(o) => {
                        o.insert(last, op["value"].clone());
                    }
                    other => {
                        let mut o = serde_json::Map::new();
                        o.insert(last, op["value"].clone());
                        *other = Value::Object(o);
                    }
                }
            }
            Some("remove") => {
                let (parent, last) = pointer_parent(doc, path).ok_or("bad path")?;
                match parent {
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if i < a.len() {
                            a.remove(i);
                        }
                    }
                    Value::Object(o) => {
                        o.remove(&last);
                    }
                    _ => {}
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

fn decode(q: &str) -> String {
    let mut out = Vec::new();
    let b = q.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if b[i] == b'%'
            && let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn label_selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("labelSelector="))
        .flat_map(|s| {
            decode(s)
                .split(',')
                .filter_map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

impl ApiState {
    fn bump(&mut self, obj: &mut Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }

    fn note(&self, what: String) {
        if let Some(t) = &self.timeline {
            t.lock().expect("timeline").push(what);
        }
    }

    fn handle(&mut self, r: &Recorded) -> (u16, Value) {
        let Some(t) = Target::parse(&r.path) else {
            return status(404, "NotFound", "unknown path");
        };
        if self.refuse_applies && r.content_type.contains("apply-patch") {
            return status(403, "Forbidden", "applies are refused");
        }
        match (&r.method, &t.name) {
            (&Method::GET, Some(name)) => match self.objects.get(&t.key(name)).cloned() {
                Some(o) => {
                    if std::mem::take(&mut self.change_after_next_get) {
                        let mut changed = o.clone();
                        self.bump(&mut changed);
                        self.objects.insert(t.key(name), changed);
                    }
                    (200, o)
                }
                None => status(404, "NotFound", &format!("{} {name} not found", t.resource)),
            },
            (&Method::GET, None) => {
                let selector = label_selector(&r.query);
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        let mut p = k.splitn(4, '/');
                        let (g, res, ns) = (p.next(), p.next(), p.next());
                        g == Some(t.group.as_str())
                            && res == Some(t.resource.as_str())
                            && t.namespace.as_deref().is_none_or(|n| Some(n) == ns)
                    })
                    .map(|(_, v)| v.clone())
                    .filter(|v| {
                        selector
                            .iter()
                            .all(|(k, val)| v["metadata"]["labels"][k].as_str() == Some(val))
                    })
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List",
                           "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
                )
            }
            (&Method::POST, None) => {
                let mut obj = r.body.clone();
                let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                    return status(422, "Invalid", "no name");
                };
                let key = t.key(&name);
                if self.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", "exists");
                }
                obj["metadata"]["uid"] = json!(format!("uid-{name}"));
                if let Some(ns) = &t.namespace {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                self.bump(&mut obj);
                self.note(format!("create {} {name}", t.resource));
                self.objects.insert(key, obj.clone());
                (201, obj)
            }
            (&Method::PATCH, Some(name)) | (&Method::PUT, Some(name)) => {
                let key = t.key(name);
                let apply = r.content_type.contains("apply-patch");
                let existing = self.objects.get(&key).cloned();
                let mut obj = match existing {
                    Some(o) => o,
                    None if apply => {
                        let mut o = json!({"metadata": {"name": name, "uid": format!("uid-{name}"),
                                                        "generation": 1}});
                        if let Some(ns) = &t.namespace {
                            o["metadata"]["namespace"] = json!(ns);
                        }
                        o
                    }
                    None => {
                        return status(
                            404,
                            "NotFound",
                            &format!("{} {name} not found", t.resource),
                        );
                    }
                };
                let current_rv = obj["metadata"]["resourceVersion"].clone();
                let body_rv = &r.body["metadata"]["resourceVersion"];
                let is_status = t.sub.as_deref() == Some("status");
                if r.method == Method::PUT {
                    if is_status && self.conflict_next_status_put {
                        self.conflict_next_status_put = false;
                        return status(409, "Conflict", "the object has been modified");
                    }
                    if body_rv != &current_rv {
                        return status(409, "Conflict", "the object has been modified");
                    }
                    if is_status {
                        obj["status"] = r.body["status"].clone();
                    } else {
                        let keep_status = obj.get("status").cloned();
                        obj = r.body.clone();
                        if let Some(s) = keep_status {
                            obj["status"] = s;
                        }
                    }
                } else if r.content_type.contains("json-patch") {
                    if let Err(e) = json_patch(&mut obj, &r.body) {
                        return status(422, "Invalid", &e);
                    }
                } else {
                    if !body_rv.is_null() && body_rv != &current_rv {
                        return status(409, "Conflict", "the object has been modified");
                    }
                    let mut body = r.body.clone();
                    if is_status {
                        body = json!({"status": body["status"].clone()});
                    } else if let Some(o) = body.as_object_mut() {
                        o.remove("status");
                    }
                    if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                    let old_spec = obj.get("spec").cloned();
                    merge(&mut obj, &body);
                    if !is_status
                        && obj.get("spec").cloned() != old_spec
                        && existing_generation(&obj)
                    {
                        let g = obj["metadata"]["generation"].as_i64().unwrap_or(0);
                        obj["metadata"]["generation"] = json!(g + 1);
                    }
                }
                self.bump(&mut obj);
                self.note(format!(
                    "{} {}{} {name}",
                    if r.method == Method::PUT {
                        "update"
                    } else {
                        "patch"
                    },
                    t.resource,
                    t.sub.as_ref().map(|s| format!("/{s}")).unwrap_or_default()
                ));
                self.objects.insert(key, obj.clone());
                (200, obj)
            }
            (&Method::DELETE, Some(name)) => match self.objects.remove(&t.key(name)) {
                Some(o) => {
                    self.note(format!("delete {} {name}", t.resource));
                    (200, o)
                }
                None => status(404, "NotFound", "not found"),
            },
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}

fn existing_generation(obj: &Value) -> bool {
    obj["metadata"]["generation"].is_i64()
}

impl FakeApi {
    /// A kube client whose requests this fake answers.
    pub fn start() -> (Client, FakeApi) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let api = FakeApi {
            state: Arc::new(Mutex::new(ApiState::default())),
            client: client.clone(),
        };
        let state = api.state.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let recorded = Recorded {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or("").to_string(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                    body: serde_json::from_slice(&bytes)
                        .or_else(|_| serde_yaml::from_slice(&bytes))
                        .unwrap_or(Value::Null),
                };
                let mut watch = recorded.query.contains("watch=true");
                let (code, body) = {
                    let mut s = state.lock().expect("api state");
                    s.requests.push(recorded.clone());
                    // A hung write is held open like a watch.
                    watch |= s.hang_lease_writes
                        && recorded.path.contains("/leases")
                        && recorded.method != Method::GET;
                    if watch {
                        (0, Value::Null)
                    } else {
                        s.handle(&recorded)
                    }
                };
                if watch {
                    // A watch that stays open with no events.
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(600)).await;
                        drop(send);
                    });
                    continue;
                }
                let response = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
                    .expect("response");
                send.send_response(response);
            }
        });
        (client, api)
    }

    /// Stores an object as if it had been created (needs apiVersion, kind,
    /// metadata.name and metadata.namespace); returns it as stored.
    pub fn insert(&self, mut obj: Value) -> Value {
        let api_version = obj["apiVersion"].as_str().expect("apiVersion").to_string();
        let group = api_version
            .rsplit_once('/')
            .map(|(g, _)| g)
            .unwrap_or("")
            .to_string();
        let kind = obj["kind"].as_str().expect("kind").to_lowercase();
        let resource = match kind.strip_suffix('y') {
            Some(stem) => format!("{stem}ies"),
            None => format!("{kind}s"),
        };
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut s = self.state.lock().expect("api state");
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{name}"));
        }
        if obj["metadata"]["generation"].is_null() {
            obj["metadata"]["generation"] = json!(1);
        }
        s.bump(&mut obj);
        s.objects
            .insert(format!("{group}/{resource}/{ns}/{name}"), obj.clone());
        obj
    }

    /// An object, if stored.
    pub fn get(&self, group: &str, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .expect("api state")
            .objects
            .get(&format!("{group}/{resource}/{ns}/{name}"))
            .cloned()
    }

    /// Removes an object (a pod vanishing).
    pub fn remove(&self, group: &str, resource: &str, ns: &str, name: &str) {
        self.state
            .lock()
            .expect("api state")
            .objects
            .remove(&format!("{group}/{resource}/{ns}/{name}"));
    }

    /// Does what the StatefulSet controller does for ordinal `i` of
    /// StatefulSet `sts`: stores a pod (new uid) with the template's labels
    /// and annotations and the update revision (if the StatefulSet's status
    /// has one) as `controller-revision-hash`; Ready or not.
    pub fn pod_from_stateful_set(&self, ns: &str, sts: &str, i: i32, ready: bool) -> Value {
        let set = self
            .get("apps", "statefulsets", ns, sts)
            .expect("the StatefulSet exists");
        let template = &set["spec"]["template"]["metadata"];
        let mut labels = template["labels"].clone();
        if let Some(rev) = set["status"]["updateRevision"].as_str() {
            labels["controller-revision-hash"] = json!(rev);
        }
        let rv = self.state.lock().expect("api state").rv;
        let name = format!("{sts}-{i}");
        self.insert(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": format!("uid-{name}-{rv}"),
                "labels": labels,
                "annotations": template["annotations"].clone(),
            },
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().expect("api state").requests.clone()
    }
}

/// A broker as the fake admin API holds it.
#[derive(Clone, Debug, Default)]
pub struct FakeBroker {
    /// Answers at all.
    pub up: bool,
    /// Its status.
    pub status: pb::StatusResponse,
    /// Topics by name.
    pub topics: BTreeMap<String, pb::TopicInfo>,
    /// The newest epoch it was told about (follow or promote): like a real
    /// broker it refuses to follow an older one and to be promoted in one
    /// not above it. Its status's `epoch` is that of its log's tail, which
    /// a follow does not change.
    pub fence: u64,
    /// When set, `follow` fails with this message (its admin API answers
    /// status but the call errs or times out) and changes nothing.
    pub refuse_follow: Option<String>,
    /// When set, the offset its log ends at once it is told to follow: it
    /// received that much from the old master after it was observed and
    /// before the fence.
    pub offset_when_fenced: Option<u64>,
}

/// Fake brokers keyed by admin address; logs calls into a timeline.
#[derive(Clone, Default)]
pub struct FakeBrokers {
    /// The brokers.
    pub brokers: Arc<Mutex<BTreeMap<String, FakeBroker>>>,
    /// Where calls are logged.
    pub timeline: Timeline,
    /// What masters report of the brokers that follow them.
    pub replication: Arc<Mutex<FakeReplication>>,
    /// When set, `switchover` fails with this message and changes nothing.
    pub switchover_error: Arc<Mutex<Option<String>>>,
}

/// What the fake masters report of their slaves.
#[derive(Clone, Debug)]
pub struct FakeReplication {
    /// A master's status lists as its slaves the brokers that follow it
    /// (replication address `repl-<broker id>`), as a real master lists the
    /// slaves that connected to it (on by default). Off, it reports the
    /// `slaves` set in its status (none unless a test sets them).
    pub listed: bool,
    /// Broker ids listed as connected but out of sync (lagging).
    pub lagging: BTreeSet<String>,
    /// Broker ids listed as not connected (their stream broke), though they
    /// still say they follow the master.
    pub disconnected: BTreeSet<String>,
}

impl Default for FakeReplication {
    fn default() -> Self {
        Self {
            listed: true,
            lagging: BTreeSet::new(),
            disconnected: BTreeSet::new(),
        }
    }
}

impl FakeBrokers {
    /// Adds a reachable standby broker at `addr` holding `max_offset` bytes.
    pub fn add(&self, addr: &str, broker_id: &str, max_offset: u64) {
        self.brokers.lock().expect("brokers").insert(
            addr.to_string(),
            FakeBroker {
                up: true,
                status: pb::StatusResponse {
                    broker_id: broker_id.into(),
                    role: pb::Role::Slave as i32,
                    max_offset,
                    store_id: format!("store-{broker_id}"),
                    ..Default::default()
                },
                topics: BTreeMap::new(),
                ..Default::default()
            },
        );
    }

    /// Masters report their followers as slaves, all connected and in sync
    /// (see [`FakeReplication`]).
    pub fn track_replication(&self) {
        *self.replication.lock().expect("replication") = FakeReplication::default();
    }

    /// Whether masters list their followers as slaves (see
    /// [`FakeReplication::listed`]).
    pub fn list_slaves(&self, listed: bool) {
        self.replication.lock().expect("replication").listed = listed;
    }

    /// Marks the broker `broker_id` as lagging (out of sync) or caught up.
    pub fn set_lagging(&self, broker_id: &str, lagging: bool) {
        let mut r = self.replication.lock().expect("replication");
        r.listed = true;
        if lagging {
            r.lagging.insert(broker_id.to_string());
        } else {
            r.lagging.remove(broker_id);
        }
    }

    /// Marks the broker `broker_id`'s stream from its master as broken
    /// (listed as not connected) or connected again.
    pub fn set_disconnected(&self, broker_id: &str, disconnected: bool) {
        let mut r = self.replication.lock().expect("replication");
        r.listed = true;
        if disconnected {
            r.disconnected.insert(broker_id.to_string());
        } else {
            r.disconnected.remove(broker_id);
        }
    }

    /// The broker at `addr` restarted: back in standby, following nobody.
    pub fn restart(&self, addr: &str) {
        self.with(addr, |b| {
            b.up = true;
            b.status.role = pb::Role::Slave as i32;
            b.status.master_address.clear();
            b.status.slaves.clear();
        });
    }

    fn status_of(&self, addr: &str) -> Result<pb::StatusResponse, AdminError> {
        let brokers = self.brokers.lock().expect("brokers");
        let b = match brokers.get(addr) {
            Some(b) if b.up => b,
            _ => return Err(format!("cannot connect to {addr}")),
        };
        let mut st = b.status.clone();
        let replication = self.replication.lock().expect("replication");
        if replication.listed && st.role == pb::Role::Master as i32 {
            let repl = format!("repl-{}", st.broker_id);
            st.slaves = brokers
                .values()
                .filter(|o| {
                    o.up && o.status.role == pb::Role::Slave as i32
                        && o.status.master_address == repl
                })
                .map(|o| {
                    let id = &o.status.broker_id;
                    let connected = !replication.disconnected.contains(id);
                    let in_sync = connected && !replication.lagging.contains(id);
                    pb::SlaveStatus {
                        broker_id: id.clone(),
                        connected,
                        in_sync,
                        lag_bytes: if in_sync { 0 } else { 100 << 20 },
                        ..Default::default()
                    }
                })
                .collect();
        }
        Ok(st)
    }

    /// Changes a broker.
    pub fn with<R>(&self, addr: &str, f: impl FnOnce(&mut FakeBroker) -> R) -> R {
        f(self
            .brokers
            .lock()
            .expect("brokers")
            .get_mut(addr)
            .expect("known broker"))
    }

    fn call<R>(
        &self,
        addr: &str,
        what: String,
        f: impl FnOnce(&mut FakeBroker) -> Result<R, AdminError>,
    ) -> Result<R, AdminError> {
        let mut brokers = self.brokers.lock().expect("brokers");
        match brokers.get_mut(addr) {
            Some(b) if b.up => {
                if !what.is_empty() {
                    self.timeline.lock().expect("timeline").push(what);
                }
                f(b)
            }
            _ => Err(format!("cannot connect to {addr}")),
        }
    }
}

impl BrokerAdmin for FakeBrokers {
    fn status<'a>(
        &'a self,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<pb::StatusResponse, AdminError>> {
        Box::pin(async move { self.status_of(addr) })
    }
    fn promote<'a>(
        &'a self,
        addr: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<pb::PromoteResponse, AdminError>> {
        Box::pin(async move {
            self.call(addr, format!("promote {addr} epoch {epoch}"), |b| {
                let known = b.fence.max(b.status.epoch);
                if epoch <= known {
                    return Err(format!("stale epoch {epoch}: {known} is known"));
                }
                b.fence = epoch;
                b.status.role = pb::Role::Master as i32;
                b.status.epoch = epoch;
                b.status.master_address.clear();
                Ok(pb::PromoteResponse {
                    epoch,
                    start_offset: b.status.max_offset,
                })
            })
        })
    }
    fn follow<'a>(
        &'a self,
        addr: &'a str,
        master: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<pb::FollowResponse, AdminError>> {
        Box::pin(async move {
            let refused = self.call(addr, String::new(), |b| {
                let known = b.fence.max(b.status.epoch);
                if let Some(e) = b.refuse_follow.clone() {
                    Err(e)
                } else if epoch < known {
                    Err(format!("stale epoch {epoch}: {known} is known"))
                } else {
                    Ok(())
                }
            });
            refused?;
            self.call(
                addr,
                format!("follow {addr} -> {master} epoch {epoch}"),
                |b| {
                    b.fence = epoch;
                    b.status.role = pb::Role::Slave as i32;
                    b.status.master_address = master.to_string();
                    if let Some(end) = b.offset_when_fenced.take() {
                        b.status.max_offset = end;
                    }
                    Ok(pb::FollowResponse::default())
                },
            )
        })
    }
    fn switchover<'a>(
        &'a self,
        addr: &'a str,
        req: pb::SwitchoverRequest,
    ) -> BoxFuture<'a, Result<pb::SwitchoverResponse, AdminError>> {
        Box::pin(async move {
            if let Some(e) = self.switchover_error.lock().expect("switchover").clone() {
                self.timeline.lock().expect("timeline").push(format!(
                    "failed switchover {addr} -> {}",
                    req.target_admin_address
                ));
                return Err(e);
            }
            let target = req.target_admin_address.clone();
            self.call(
                addr,
                format!("switchover {addr} -> {target} epoch {}", req.new_epoch),
                |b| {
                    b.fence = req.new_epoch;
                    b.status.role = pb::Role::Slave as i32;
                    b.status.master_address = format!("repl-{}", req.target_broker_id);
                    Ok(())
                },
            )?;
            self.call(&target, String::new(), |b| {
                b.fence = req.new_epoch;
                b.status.role = pb::Role::Master as i32;
                b.status.epoch = req.new_epoch;
                b.status.master_address.clear();
                Ok(pb::SwitchoverResponse {
                    epoch: req.new_epoch,
                    write_pause_ms: 1,
                })
            })
        })
    }
    fn describe_topic<'a>(
        &'a self,
        addr: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<pb::TopicInfo>, AdminError>> {
        Box::pin(async move { self.call(addr, String::new(), |b| Ok(b.topics.get(name).cloned())) })
    }
    fn create_topic<'a>(
        &'a self,
        addr: &'a str,
        req: pb::CreateTopicRequest,
    ) -> BoxFuture<'a, Result<pb::TopicInfo, AdminError>> {
        Box::pin(async move {
            self.call(addr, format!("create topic {}", req.name), |b| {
                let info = pb::TopicInfo {
                    name: req.name.clone(),
                    queue_count: req.queue_count,
                    message_type: req.message_type,
                    queues: Vec::new(),
                };
                b.topics.insert(req.name.clone(), info.clone());
                Ok(info)
            })
        })
    }
    fn update_topic<'a>(
        &'a self,
        addr: &'a str,
        req: pb::UpdateTopicRequest,
    ) -> BoxFuture<'a, Result<pb::TopicInfo, AdminError>> {
        Box::pin(async move {
            self.call(
                addr,
                format!("update topic {} queues {}", req.name, req.queue_count),
                |b| {
                    let t = b.topics.get_mut(&req.name).ok_or("no such topic")?;
                    t.queue_count = req.queue_count;
                    Ok(t.clone())
                },
            )
        })
    }
    fn delete_topic<'a>(
        &'a self,
        addr: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            self.call(addr, format!("delete topic {name}"), |b| {
                b.topics.remove(name);
                Ok(())
            })
        })
    }
}

/// The pod spec of the StatefulSet the model builds for `bg`.
pub fn pod_spec(bg: &keelmq_crds::BrokerGroup) -> k8s_openapi::api::core::v1::PodSpec {
    crate::model::stateful_set(bg)
        .expect("sts")
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
}

/// The paths `c` mounts writable (not read-only).
pub fn writable_mounts(c: &k8s_openapi::api::core::v1::Container) -> Vec<&str> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.read_only != Some(true))
        .map(|m| m.mount_path.as_str())
        .collect()
}
