//! The classic consumer group coordinator (JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup, DescribeGroups, ListGroups, DeleteGroups).
//!
//! Every group is coordinated by this gateway. A group moves through
//! Empty -> PreparingRebalance -> CompletingRebalance -> Stable:
//! a join (or a leave, or a member's session expiring) starts a rebalance;
//! the rebalance completes when every known member has rejoined, or at the
//! rebalance timeout (members that did not rejoin are removed). The first
//! rebalance of an empty group waits `group_initial_rebalance_delay_ms` so
//! members starting together land in one generation. The leader's
//! SyncGroup carries every member's assignment; the assignors (eager or
//! cooperative) run in the clients, as in Kafka.
//!
//! A new dynamic member joining with JoinGroup v4+ and an empty member id
//! is first answered MEMBER_ID_REQUIRED with a generated id (KIP-394) and
//! joins when it comes back with that id; until then the id is *pending*
//! (it expires after the session timeout) and a rebalance in progress
//! waits for it, as in Kafka. A client that gives up after the first
//! answer therefore leaves no member behind to wait for.
//!
//! Static members (`group.instance.id`) keep their identity across
//! restarts of the client: a rejoin with a known instance id replaces the
//! old member id and, when nothing changed, gets the current assignment
//! without a rebalance.
//!
//! State is in memory and guarded by short `std` locks; waiting requests
//! hold a oneshot receiver, never a lock. Committed offsets are not here:
//! they are durable cursors (see `offsets`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;
use mapping::kafka::ErrorCode;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::conn::Session;
use crate::state::State;
use crate::KafkaConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Empty => "Empty",
            Phase::PreparingRebalance => "PreparingRebalance",
            Phase::CompletingRebalance => "CompletingRebalance",
            Phase::Stable => "Stable",
        }
    }
}

#[derive(Debug)]
struct JoinResult {
    error: ErrorCode,
    generation: i32,
    protocol_type: String,
    protocol: String,
    leader: String,
    member_id: String,
    members: Vec<(String, Option<String>, Bytes)>,
    /// KIP-814: a static leader that rejoined gets the members but must
    /// not compute a new assignment.
    skip_assignment: bool,
}

#[derive(Debug)]
struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_seen: Instant,
    join_waiter: Option<oneshot::Sender<JoinResult>>,
    sync_waiter: Option<oneshot::Sender<(ErrorCode, Bytes)>>,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug)]
struct Group {
    id: String,
    phase: Phase,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    /// In join order.
    members: Vec<Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not joined yet, with
    /// when they expire.
    pending: HashMap<String, Instant>,
    /// Bumped at every new rebalance; timers of older ones do nothing.
    rebalance_seq: u64,
    not_before: Instant,
    deadline: Instant,
}

impl Group {
    fn new(id: &str) -> Group {
        let now = Instant::now();
        Group {
            id: id.to_owned(),
            phase: Phase::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: Vec::new(),
            pending: HashMap::new(),
            rebalance_seq: 0,
            not_before: now,
            deadline: now,
        }
    }

    fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    fn member_mut(&mut self, id: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Forgets pending member ids whose session timeout passed; returns
    /// whether any was forgotten.
    fn expire_pending(&mut self, now: Instant) -> bool {
        let before = self.pending.len();
        self.pending.retain(|_, expiry| *expiry > now);
        before != self.pending.len()
    }

    fn by_instance(&self, instance: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.instance_id.as_deref() == Some(instance))
    }

    /// Starts a rebalance (or extends the current one). Returns whether a
    /// timer must be started for the new rebalance.
    fn prepare_rebalance(&mut self, initial_delay: Duration) -> bool {
        if self.phase == Phase::PreparingRebalance {
            return false;
        }
        if self.phase == Phase::CompletingRebalance {
            for m in &mut self.members {
                if let Some(w) = m.sync_waiter.take() {
                    let _ = w.send((ErrorCode::RebalanceInProgress, Bytes::new()));
                }
            }
        }
        let now = Instant::now();
        let was_empty = self.phase == Phase::Empty;
        self.phase = Phase::PreparingRebalance;
        self.rebalance_seq += 1;
        let timeout = self
            .members
            .iter()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::from_secs(60));
        self.not_before = if was_empty { now + initial_delay } else { now };
        self.deadline = now + timeout.max(initial_delay);
        true
    }

    /// Completes the join phase if every member has rejoined (or the
    /// deadline passed).
    fn try_complete_join(&mut self) {
        if self.phase != Phase::PreparingRebalance {
            return;
        }
        let now = Instant::now();
        self.expire_pending(now);
        // Members that were told MEMBER_ID_REQUIRED are on their way back.
        let all_joined =
            self.members.iter().all(|m| m.join_waiter.is_some()) && self.pending.is_empty();
        let expired = now >= self.deadline;
        if !(expired || (all_joined && now >= self.not_before)) {
            return;
        }
        self.members.retain(|m| m.join_waiter.is_some());
        self.generation = self.generation.wrapping_add(1).max(1);
        if self.members.is_empty() {
            self.phase = Phase::Empty;
            self.leader = None;
            self.protocol = None;
            self.protocol_type = None;
            return;
        }
        let protocol = self.select_protocol();
        if self
            .leader
            .as_ref()
            .is_none_or(|l| self.member(l).is_none())
        {
            self.leader = Some(self.members[0].id.clone());
        }
        let leader = self.leader.clone().unwrap_or_default();
        self.protocol = Some(protocol.clone());
        self.phase = Phase::CompletingRebalance;
        let all: Vec<(String, Option<String>, Bytes)> = self
            .members
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    m.instance_id.clone(),
                    m.metadata_for(&protocol),
                )
            })
            .collect();
        let protocol_type = self.protocol_type.clone().unwrap_or_default();
        for m in &mut self.members {
            m.last_seen = now;
            m.assignment = Bytes::new();
            if let Some(w) = m.join_waiter.take() {
                let _ = w.send(JoinResult {
                    error: ErrorCode::None,
                    generation: self.generation,
                    protocol_type: protocol_type.clone(),
                    protocol: protocol.clone(),
                    leader: leader.clone(),
                    member_id: m.id.clone(),
                    members: if m.id == leader {
                        all.clone()
                    } else {
                        Vec::new()
                    },
                    skip_assignment: false,
                });
            }
        }
    }

    /// The protocol every member supports that gets the most first-choice
    /// votes (ties: the leader candidate's preference order).
    fn select_protocol(&self) -> String {
        let first = &self.members[0];
        let common: Vec<&String> = first
            .protocols
            .iter()
            .map(|(n, _)| n)
            .filter(|n| {
                self.members
                    .iter()
                    .all(|m| m.protocols.iter().any(|(x, _)| x == *n))
            })
            .collect();
        let mut best: Option<(&String, usize)> = None;
        for c in &common {
            let votes = self
                .members
                .iter()
                .filter(|m| {
                    m.protocols
                        .iter()
                        .find(|(n, _)| common.contains(&n))
                        .is_some_and(|(n, _)| n == *c)
                })
                .count();
            if best.is_none_or(|(_, v)| votes > v) {
                best = Some((c, votes));
            }
        }
        best.map(|(n, _)| n.clone()).unwrap_or_default()
    }

    /// Removes a member. A join or sync it has waiting is answered
    /// UNKNOWN_MEMBER_ID, as Kafka answers it (a client still running
    /// rejoins as a new member).
    fn remove_member(&mut self, id: &str) -> bool {
        let Some(i) = self.members.iter().position(|m| m.id == id) else {
            return false;
        };
        let mut m = self.members.remove(i);
        if let Some(w) = m.join_waiter.take() {
            let _ = w.send(JoinResult {
                error: ErrorCode::UnknownMemberId,
                generation: -1,
                protocol_type: String::new(),
                protocol: String::new(),
                leader: String::new(),
                member_id: String::new(),
                members: Vec::new(),
                skip_assignment: false,
            });
        }
        if let Some(w) = m.sync_waiter.take() {
            let _ = w.send((ErrorCode::UnknownMemberId, Bytes::new()));
        }
        true
    }

    /// After members left: rebalance the rest, or become Empty.
    fn after_departure(&mut self, initial_delay: Duration) -> bool {
        if self.members.is_empty() {
            if self.phase != Phase::PreparingRebalance {
                self.generation = self.generation.wrapping_add(1).max(1);
            }
            self.phase = Phase::Empty;
            self.leader = None;
            self.protocol = None;
            self.protocol_type = None;
            self.rebalance_seq += 1;
            return false;
        }
        let timer = self.prepare_rebalance(initial_delay);
        self.try_complete_join();
        timer
    }
}

/// All groups of the handler.
#[derive(Debug)]
pub(crate) struct Coordinator {
    groups: Mutex<HashMap<String, Arc<Mutex<Group>>>>,
    initial_delay: Duration,
    min_session: i32,
    max_session: i32,
}

impl Coordinator {
    pub(crate) fn new(config: &KafkaConfig) -> Coordinator {
        Coordinator {
            groups: Mutex::new(HashMap::new()),
            initial_delay: Duration::from_millis(config.group_initial_rebalance_delay_ms),
            min_session: config.group_min_session_timeout_ms,
            max_session: config.group_max_session_timeout_ms,
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Mutex<Group>>> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn get_or_create(&self, id: &str) -> Arc<Mutex<Group>> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Group::new(id))))
            .clone()
    }

    fn all(&self) -> Vec<Arc<Mutex<Group>>> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Expires members whose session timed out, every 250 ms.
    pub(crate) fn spawn_reaper(state: &Arc<State>) {
        let weak = Arc::downgrade(state);
        let shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(state) = weak.upgrade() else { break };
                let c = &state.groups;
                for g in c.all() {
                    let timer = {
                        let mut g = lock(&g);
                        let now = Instant::now();
                        if g.expire_pending(now) {
                            g.try_complete_join();
                        }
                        let expired: Vec<String> = g
                            .members
                            .iter()
                            .filter(|m| {
                                m.join_waiter.is_none()
                                    && g.phase != Phase::PreparingRebalance
                                    && now.duration_since(m.last_seen) > m.session_timeout
                            })
                            .map(|m| m.id.clone())
                            .collect();
                        if expired.is_empty() {
                            None
                        } else {
                            for id in &expired {
                                tracing::info!(group = %g.id, member = %id, "member session expired");
                                g.remove_member(id);
                            }
                            g.after_departure(c.initial_delay)
                                .then_some(g.rebalance_seq)
                        }
                    };
                    if let Some(seq) = timer {
                        spawn_join_timer(g.clone(), seq);
                    }
                }
            }
        });
    }

    /// Checks that an offset commit comes from a current member (or is a
    /// standalone commit to a group without members).
    pub(crate) fn check_commit(
        &self,
        group: &str,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
    ) -> Result<(), ErrorCode> {
        let Some(g) = self.get(group) else {
            return if generation < 0 && member_id.is_empty() {
                Ok(())
            } else {
                Err(ErrorCode::UnknownMemberId)
            };
        };
        let mut g = lock(&g);
        if generation < 0 && member_id.is_empty() {
            return if g.members.is_empty() {
                Ok(())
            } else {
                Err(ErrorCode::IllegalGeneration)
            };
        }
        if let Some(inst) = instance_id {
            if g.by_instance(inst).is_some_and(|m| m.id != member_id) {
                return Err(ErrorCode::FencedInstanceId);
            }
        }
        let gen = g.generation;
        let phase = g.phase;
        let Some(m) = g.member_mut(member_id) else {
            return Err(ErrorCode::UnknownMemberId);
        };
        m.last_seen = Instant::now();
        // Between the join and the sync nobody owns partitions yet: the
        // member retries once it has its assignment (Kafka's order).
        if phase == Phase::CompletingRebalance {
            return Err(ErrorCode::RebalanceInProgress);
        }
        if generation != gen {
            return Err(ErrorCode::IllegalGeneration);
        }
        // Commits during PreparingRebalance are how eager consumers save
        // their position before giving partitions up: allowed.
        Ok(())
    }
}

fn lock(g: &Arc<Mutex<Group>>) -> std::sync::MutexGuard<'_, Group> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drives a rebalance to completion at its delay and deadline.
fn spawn_join_timer(g: Arc<Mutex<Group>>, seq: u64) {
    tokio::spawn(async move {
        loop {
            let wake = {
                let mut gr = lock(&g);
                if gr.rebalance_seq != seq || gr.phase != Phase::PreparingRebalance {
                    return;
                }
                gr.try_complete_join();
                if gr.phase != Phase::PreparingRebalance {
                    return;
                }
                let now = Instant::now();
                if now < gr.not_before {
                    gr.not_before
                } else {
                    // Re-check periodically until the deadline (joins
                    // complete the group themselves when all are in).
                    gr.deadline.min(now + Duration::from_millis(100))
                }
            };
            tokio::time::sleep_until(wake).await;
        }
    });
}

/// Most member ids one group hands out with MEMBER_ID_REQUIRED that are
/// not back yet (each expires after its session timeout); past it a join
/// gets GROUP_MAX_SIZE_REACHED, so a client looping on empty joins cannot
/// grow the group without bound.
const MAX_PENDING_MEMBERS: usize = 10_000;

fn new_member_id(client_id: &str) -> String {
    format!("{client_id}-{}", uuid::Uuid::new_v4())
}

fn join_error(error: ErrorCode, member_id: &str) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(error.code())
        .with_generation_id(-1)
        .with_member_id(StrBytes::from_string(member_id.to_owned()))
}

pub(crate) async fn join_group(
    state: &State,
    session: &Session,
    req: JoinGroupRequest,
    version: i16,
) -> JoinGroupResponse {
    let c = &state.groups;
    let group_id = req.group_id.0.to_string();
    if group_id.is_empty() {
        return join_error(ErrorCode::InvalidGroupId, req.member_id.as_str());
    }
    if req.session_timeout_ms < c.min_session || req.session_timeout_ms > c.max_session {
        return join_error(ErrorCode::InvalidSessionTimeout, req.member_id.as_str());
    }
    if req.protocols.is_empty() || req.protocol_type.is_empty() {
        return join_error(ErrorCode::InconsistentGroupProtocol, req.member_id.as_str());
    }
    let rebalance_timeout = if version >= 1 && req.rebalance_timeout_ms > 0 {
        req.rebalance_timeout_ms
    } else {
        req.session_timeout_ms
    };
    let protocols: Vec<(String, Bytes)> = req
        .protocols
        .iter()
        .map(|p| (p.name.to_string(), p.metadata.clone()))
        .collect();
    let protocol_type = req.protocol_type.to_string();
    let instance_id = req.group_instance_id.as_ref().map(|s| s.to_string());
    let g = c.get_or_create(&group_id);
    let (rx, timer, wait) = {
        let mut gr = lock(&g);
        // Protocol compatibility with the current members.
        if !gr.members.is_empty() {
            if gr.protocol_type.as_deref() != Some(protocol_type.as_str()) {
                return join_error(ErrorCode::InconsistentGroupProtocol, req.member_id.as_str());
            }
            let shared = protocols.iter().any(|(n, _)| {
                gr.members
                    .iter()
                    .filter(|m| m.id != req.member_id.as_str())
                    .all(|m| m.protocols.iter().any(|(x, _)| x == n))
            });
            if !shared {
                return join_error(ErrorCode::InconsistentGroupProtocol, req.member_id.as_str());
            }
        }
        let mut member_id = req.member_id.to_string();
        let known_instance = instance_id
            .as_deref()
            .and_then(|i| gr.by_instance(i))
            .map(|m| m.id.clone());
        if let (Some(old), false) = (&known_instance, member_id.is_empty()) {
            if *old != member_id {
                return join_error(ErrorCode::FencedInstanceId, &member_id);
            }
        }
        let now = Instant::now();
        let mut static_fast_path = false;
        // A member coming back with the id MEMBER_ID_REQUIRED gave it
        // joins as a new member under that id.
        let pending_return = !member_id.is_empty()
            && gr.member(&member_id).is_none()
            && gr
                .pending
                .remove(&member_id)
                .is_some_and(|expiry| expiry > now);
        if member_id.is_empty() || pending_return {
            if member_id.is_empty() {
                member_id = new_member_id(&session.client_id);
                // KIP-394: from v4 a dynamic member first learns its id,
                // then joins with it (a static member is known by its
                // instance id already).
                if version >= 4 && instance_id.is_none() {
                    gr.expire_pending(now);
                    if gr.pending.len() >= MAX_PENDING_MEMBERS {
                        return join_error(ErrorCode::GroupMaxSizeReached, "");
                    }
                    let expiry = now + Duration::from_millis(req.session_timeout_ms as u64);
                    gr.pending.insert(member_id.clone(), expiry);
                    return join_error(ErrorCode::MemberIdRequired, &member_id);
                }
            }
            match known_instance {
                Some(old) => {
                    // A static member restarted: it takes over its old
                    // identity under a new member id.
                    let is_leader = gr.leader.as_deref() == Some(old.as_str());
                    let phase = gr.phase;
                    let proto = gr.protocol.clone();
                    let Some(m) = gr.member_mut(&old) else {
                        return join_error(ErrorCode::UnknownServerError, "");
                    };
                    if let Some(w) = m.join_waiter.take() {
                        let _ = w.send(JoinResult {
                            error: ErrorCode::FencedInstanceId,
                            generation: -1,
                            protocol_type: String::new(),
                            protocol: String::new(),
                            leader: String::new(),
                            member_id: old.clone(),
                            members: Vec::new(),
                            skip_assignment: false,
                        });
                    }
                    if let Some(w) = m.sync_waiter.take() {
                        let _ = w.send((ErrorCode::FencedInstanceId, Bytes::new()));
                    }
                    let unchanged = proto.as_ref().is_some_and(|p| {
                        m.metadata_for(p)
                            == protocols
                                .iter()
                                .find(|(n, _)| n == p)
                                .map(|(_, b)| b.clone())
                                .unwrap_or_default()
                    });
                    m.id = member_id.clone();
                    m.protocols = protocols.clone();
                    m.session_timeout = Duration::from_millis(req.session_timeout_ms as u64);
                    m.rebalance_timeout = Duration::from_millis(rebalance_timeout as u64);
                    m.last_seen = now;
                    m.client_id = session.client_id.clone();
                    m.client_host = session.client_host.clone();
                    if is_leader {
                        gr.leader = Some(member_id.clone());
                    }
                    // A static leader can skip the rebalance only with
                    // JoinGroup v9 (skip_assignment); older ones rebalance.
                    static_fast_path =
                        phase == Phase::Stable && unchanged && (!is_leader || version >= 9);
                }
                None => {
                    gr.members.push(Member {
                        id: member_id.clone(),
                        instance_id: instance_id.clone(),
                        client_id: session.client_id.clone(),
                        client_host: session.client_host.clone(),
                        session_timeout: Duration::from_millis(req.session_timeout_ms as u64),
                        rebalance_timeout: Duration::from_millis(rebalance_timeout as u64),
                        protocols: protocols.clone(),
                        assignment: Bytes::new(),
                        last_seen: now,
                        join_waiter: None,
                        sync_waiter: None,
                    });
                    if gr.members.len() == 1 {
                        gr.protocol_type = Some(protocol_type.clone());
                    }
                }
            }
        } else {
            let phase = gr.phase;
            let is_leader = gr.leader.as_deref() == Some(member_id.as_str());
            let proto = gr.protocol.clone();
            let Some(m) = gr.member_mut(&member_id) else {
                return join_error(ErrorCode::UnknownMemberId, &member_id);
            };
            let unchanged = proto.as_ref().is_some_and(|p| {
                m.metadata_for(p)
                    == protocols
                        .iter()
                        .find(|(n, _)| n == p)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_default()
            });
            m.protocols = protocols.clone();
            m.session_timeout = Duration::from_millis(req.session_timeout_ms as u64);
            m.rebalance_timeout = Duration::from_millis(rebalance_timeout as u64);
            m.last_seen = now;
            // A follower rejoining with nothing changed while the group is
            // stable just gets the current generation back.
            static_fast_path = phase == Phase::Stable && unchanged && !is_leader;
        }
        if static_fast_path {
            let leader = gr.leader.clone().unwrap_or_default();
            let protocol = gr.protocol.clone().unwrap_or_default();
            let is_leader = leader == member_id;
            let resp = JoinResult {
                error: ErrorCode::None,
                generation: gr.generation,
                protocol_type: gr.protocol_type.clone().unwrap_or_default(),
                protocol: protocol.clone(),
                leader,
                member_id: member_id.clone(),
                members: if is_leader {
                    gr.members
                        .iter()
                        .map(|m| {
                            (
                                m.id.clone(),
                                m.instance_id.clone(),
                                m.metadata_for(&protocol),
                            )
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                skip_assignment: is_leader,
            };
            return join_response(resp, version);
        }
        let (tx, rx) = oneshot::channel();
        if let Some(m) = gr.member_mut(&member_id) {
            m.join_waiter = Some(tx);
        }
        let timer = gr.prepare_rebalance(c.initial_delay);
        gr.try_complete_join();
        let wait = gr.deadline.saturating_duration_since(now) + Duration::from_secs(5);
        (rx, timer.then_some(gr.rebalance_seq), wait)
    };
    if let Some(seq) = timer {
        spawn_join_timer(g.clone(), seq);
    }
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(r)) => join_response(r, version),
        _ => join_error(ErrorCode::RebalanceInProgress, req.member_id.as_str()),
    }
}

fn join_response(r: JoinResult, version: i16) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(r.error.code())
        .with_generation_id(r.generation)
        .with_protocol_type(Some(StrBytes::from_string(r.protocol_type)))
        .with_protocol_name(Some(StrBytes::from_string(r.protocol)))
        .with_leader(StrBytes::from_string(r.leader))
        .with_skip_assignment(r.skip_assignment && version >= 9)
        .with_member_id(StrBytes::from_string(r.member_id))
        .with_members(
            r.members
                .into_iter()
                .map(|(id, inst, meta)| {
                    JoinGroupResponseMember::default()
                        .with_member_id(StrBytes::from_string(id))
                        .with_group_instance_id(if version >= 5 {
                            inst.map(StrBytes::from_string)
                        } else {
                            None
                        })
                        .with_metadata(meta)
                })
                .collect(),
        )
}

pub(crate) async fn sync_group(state: &State, req: SyncGroupRequest) -> SyncGroupResponse {
    let err = |e: ErrorCode| SyncGroupResponse::default().with_error_code(e.code());
    let Some(g) = state.groups.get(req.group_id.0.as_str()) else {
        return err(ErrorCode::UnknownMemberId);
    };
    let member_id = req.member_id.to_string();
    let (rx, wait, ptype, pname) = {
        let mut gr = lock(&g);
        if let Some(inst) = req.group_instance_id.as_ref() {
            if gr
                .by_instance(inst.as_str())
                .is_some_and(|m| m.id != member_id)
            {
                return err(ErrorCode::FencedInstanceId);
            }
        }
        if gr.member(&member_id).is_none() {
            return err(ErrorCode::UnknownMemberId);
        }
        if req.generation_id != gr.generation {
            return err(ErrorCode::IllegalGeneration);
        }
        let ptype = gr.protocol_type.clone().unwrap_or_default();
        let pname = gr.protocol.clone().unwrap_or_default();
        match gr.phase {
            Phase::Empty | Phase::PreparingRebalance => return err(ErrorCode::RebalanceInProgress),
            Phase::Stable => {
                let a = gr
                    .member(&member_id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default();
                return SyncGroupResponse::default()
                    .with_protocol_type(Some(StrBytes::from_string(ptype)))
                    .with_protocol_name(Some(StrBytes::from_string(pname)))
                    .with_assignment(a);
            }
            Phase::CompletingRebalance => {}
        }
        let (tx, rx) = oneshot::channel();
        let timeout = {
            let m = gr.member_mut(&member_id).expect("checked above");
            m.sync_waiter = Some(tx);
            m.last_seen = Instant::now();
            m.rebalance_timeout
        };
        if gr.leader.as_deref() == Some(member_id.as_str()) {
            let assignments: HashMap<String, Bytes> = req
                .assignments
                .iter()
                .map(|a| (a.member_id.to_string(), a.assignment.clone()))
                .collect();
            gr.phase = Phase::Stable;
            for m in &mut gr.members {
                m.assignment = assignments.get(&m.id).cloned().unwrap_or_default();
                if let Some(w) = m.sync_waiter.take() {
                    let _ = w.send((ErrorCode::None, m.assignment.clone()));
                }
            }
            tracing::info!(group = %gr.id, generation = gr.generation, members = gr.members.len(), "group stable");
        }
        (rx, timeout + Duration::from_secs(5), ptype, pname)
    };
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok((e, a))) => SyncGroupResponse::default()
            .with_error_code(e.code())
            .with_protocol_type(Some(StrBytes::from_string(ptype)))
            .with_protocol_name(Some(StrBytes::from_string(pname)))
            .with_assignment(a),
        _ => err(ErrorCode::RebalanceInProgress),
    }
}

pub(crate) fn heartbeat(state: &State, req: HeartbeatRequest) -> HeartbeatResponse {
    let code = (|| {
        let g = state
            .groups
            .get(req.group_id.0.as_str())
            .ok_or(ErrorCode::UnknownMemberId)?;
        let mut gr = lock(&g);
        if let Some(inst) = req.group_instance_id.as_ref() {
            if gr
                .by_instance(inst.as_str())
                .is_some_and(|m| m.id != req.member_id.as_str())
            {
                return Err(ErrorCode::FencedInstanceId);
            }
        }
        let gen = gr.generation;
        let phase = gr.phase;
        let m = gr
            .member_mut(req.member_id.as_str())
            .ok_or(ErrorCode::UnknownMemberId)?;
        m.last_seen = Instant::now();
        if phase == Phase::PreparingRebalance {
            return Err(ErrorCode::RebalanceInProgress);
        }
        if req.generation_id != gen {
            return Err(ErrorCode::IllegalGeneration);
        }
        Ok(())
    })();
    HeartbeatResponse::default().with_error_code(code.err().unwrap_or(ErrorCode::None).code())
}

/// LeaveGroup, as Kafka's classic group coordinator answers it.
///
/// From v3 a request names a batch of members (KIP-345), each by member id,
/// by `group.instance.id` (an administrative removal of a static member,
/// with an empty member id), or both; each gets its own error code, and the
/// request's top-level error is NONE unless the request as a whole is
/// refused (an empty group id). A member id that MEMBER_ID_REQUIRED handed
/// out and that has not joined yet is forgotten, so a rebalance stops
/// waiting for it. Before v3 the one member's error is the top-level error.
pub(crate) fn leave_group(
    state: &State,
    req: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let c = &state.groups;
    let leaving: Vec<(String, Option<String>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|s| s.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    if req.group_id.0.is_empty() {
        return LeaveGroupResponse::default().with_error_code(ErrorCode::InvalidGroupId.code());
    }
    let g = c.get(req.group_id.0.as_str());
    let mut codes = Vec::with_capacity(leaving.len());
    let timer = match &g {
        // A group the coordinator does not know: every member is unknown.
        None => {
            codes.resize(leaving.len(), ErrorCode::UnknownMemberId);
            None
        }
        Some(g) => {
            let mut gr = lock(g);
            let now = Instant::now();
            let mut departed = false;
            let mut pending_left = false;
            for (id, inst) in &leaving {
                if !id.is_empty()
                    && gr.member(id).is_none()
                    && gr.pending.remove(id).is_some_and(|expiry| expiry > now)
                {
                    tracing::info!(group = %gr.id, member = %id, "pending member left");
                    pending_left = true;
                    codes.push(ErrorCode::None);
                    continue;
                }
                let target = if id.is_empty() {
                    // Removal by instance id alone (an admin's request).
                    match inst.as_deref().and_then(|i| gr.by_instance(i)) {
                        Some(m) => Ok(m.id.clone()),
                        None => Err(ErrorCode::UnknownMemberId),
                    }
                } else {
                    match inst {
                        Some(i) => match gr.by_instance(i) {
                            Some(m) if m.id == *id => Ok(id.clone()),
                            Some(_) => Err(ErrorCode::FencedInstanceId),
                            None => Err(ErrorCode::UnknownMemberId),
                        },
                        None if gr.member(id).is_some() => Ok(id.clone()),
                        None => Err(ErrorCode::UnknownMemberId),
                    }
                };
                codes.push(match target {
                    Ok(mid) => {
                        tracing::info!(group = %gr.id, member = %mid, "member left");
                        gr.remove_member(&mid);
                        departed = true;
                        ErrorCode::None
                    }
                    Err(e) => e,
                });
            }
            if departed {
                gr.after_departure(c.initial_delay)
                    .then_some(gr.rebalance_seq)
            } else {
                if pending_left {
                    // A rebalance may have been waiting only for it.
                    gr.try_complete_join();
                }
                None
            }
        }
    };
    if let (Some(g), Some(seq)) = (g, timer) {
        spawn_join_timer(g, seq);
    }
    if version >= 3 {
        let results = leaving
            .into_iter()
            .zip(codes)
            .map(|((id, inst), code)| {
                MemberResponse::default()
                    .with_member_id(StrBytes::from_string(id))
                    .with_group_instance_id(inst.map(StrBytes::from_string))
                    .with_error_code(code.code())
            })
            .collect();
        LeaveGroupResponse::default().with_members(results)
    } else {
        let code = codes.first().copied().unwrap_or(ErrorCode::None);
        LeaveGroupResponse::default().with_error_code(code.code())
    }
}

pub(crate) fn describe_groups(state: &State, req: DescribeGroupsRequest) -> DescribeGroupsResponse {
    let with_commits = crate::offsets::groups_with_commits(state);
    let groups = req
        .groups
        .into_iter()
        .map(|id| {
            let d = DescribedGroup::default()
                .with_group_id(id.clone())
                .with_authorized_operations(i32::MIN);
            match state.groups.get(id.0.as_str()) {
                Some(g) => {
                    let gr = lock(&g);
                    let proto = gr.protocol.clone().unwrap_or_default();
                    let stable = matches!(gr.phase, Phase::Stable | Phase::CompletingRebalance);
                    d.with_group_state(StrBytes::from_static_str(gr.phase.name()))
                        .with_protocol_type(StrBytes::from_string(
                            gr.protocol_type
                                .clone()
                                .unwrap_or_else(|| "consumer".into()),
                        ))
                        .with_protocol_data(StrBytes::from_string(if stable {
                            proto.clone()
                        } else {
                            String::new()
                        }))
                        .with_members(
                            gr.members
                                .iter()
                                .map(|m| {
                                    DescribedGroupMember::default()
                                        .with_member_id(StrBytes::from_string(m.id.clone()))
                                        .with_group_instance_id(
                                            m.instance_id.clone().map(StrBytes::from_string),
                                        )
                                        .with_client_id(StrBytes::from_string(m.client_id.clone()))
                                        .with_client_host(StrBytes::from_string(
                                            m.client_host.clone(),
                                        ))
                                        .with_member_metadata(if stable {
                                            m.metadata_for(&proto)
                                        } else {
                                            Bytes::new()
                                        })
                                        .with_member_assignment(m.assignment.clone())
                                })
                                .collect(),
                        )
                }
                None if with_commits.contains(id.0.as_str()) => d
                    .with_group_state(StrBytes::from_static_str("Empty"))
                    .with_protocol_type(StrBytes::from_static_str("consumer")),
                None => d.with_group_state(StrBytes::from_static_str("Dead")),
            }
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

pub(crate) fn list_groups(state: &State, req: ListGroupsRequest) -> ListGroupsResponse {
    let mut listed: HashMap<String, (String, String)> = HashMap::new();
    for g in crate::offsets::groups_with_commits(state) {
        listed.insert(g, ("consumer".into(), "Empty".into()));
    }
    for g in state.groups.all() {
        let gr = lock(&g);
        if gr.phase == Phase::Empty && !listed.contains_key(&gr.id) && gr.generation == 0 {
            continue;
        }
        listed.insert(
            gr.id.clone(),
            (
                gr.protocol_type
                    .clone()
                    .unwrap_or_else(|| "consumer".into()),
                gr.phase.name().to_owned(),
            ),
        );
    }
    let filter: Vec<String> = req.states_filter.iter().map(|s| s.to_lowercase()).collect();
    let mut groups: Vec<ListedGroup> = listed
        .into_iter()
        .filter(|(_, (_, st))| filter.is_empty() || filter.contains(&st.to_lowercase()))
        .map(|(id, (pt, st))| {
            ListedGroup::default()
                .with_group_id(StrBytes::from_string(id).into())
                .with_protocol_type(StrBytes::from_string(pt))
                .with_group_state(StrBytes::from_string(st))
                .with_group_type(StrBytes::from_static_str("classic"))
        })
        .collect();
    groups.sort_by(|a, b| a.group_id.0.as_str().cmp(b.group_id.0.as_str()));
    ListGroupsResponse::default().with_groups(groups)
}

pub(crate) async fn delete_groups(state: &State, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let mut results = Vec::new();
    for id in req.groups_names {
        let name = id.0.to_string();
        let in_memory = state.groups.get(&name);
        let code = if in_memory
            .as_ref()
            .is_some_and(|g| !lock(g).members.is_empty())
        {
            ErrorCode::NonEmptyGroup
        } else {
            let had_cursors = crate::offsets::delete_group_cursors(state, &name).await;
            let had_group = state
                .groups
                .groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name)
                .is_some();
            if had_cursors || had_group {
                ErrorCode::None
            } else {
                ErrorCode::GroupIdNotFound
            }
        };
        results.push(
            DeletableGroupResult::default()
                .with_group_id(id)
                .with_error_code(code.code()),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, protocols: &[&str]) -> Member {
        Member {
            id: id.into(),
            instance_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(10),
            protocols: protocols
                .iter()
                .map(|p| (p.to_string(), Bytes::from(format!("meta-{id}"))))
                .collect(),
            assignment: Bytes::new(),
            last_seen: Instant::now(),
            join_waiter: None,
            sync_waiter: None,
        }
    }

    fn join(g: &mut Group, id: &str) -> oneshot::Receiver<JoinResult> {
        let (tx, rx) = oneshot::channel();
        g.member_mut(id).unwrap().join_waiter = Some(tx);
        rx
    }

    #[tokio::test]
    async fn join_completes_when_every_member_rejoined() {
        let mut g = Group::new("g");
        g.members.push(member("a", &["range", "roundrobin"]));
        g.members.push(member("b", &["roundrobin", "range"]));
        g.protocol_type = Some("consumer".into());
        let ra = join(&mut g, "a");
        assert!(g.prepare_rebalance(Duration::ZERO));
        g.try_complete_join();
        assert_eq!(g.phase, Phase::PreparingRebalance, "b has not joined");
        let rb = join(&mut g, "b");
        g.try_complete_join();
        assert_eq!(g.phase, Phase::CompletingRebalance);
        let (a, b) = (ra.await.unwrap(), rb.await.unwrap());
        assert_eq!((a.generation, b.generation), (1, 1));
        assert_eq!(a.leader, "a");
        assert_eq!(a.members.len(), 2, "the leader gets every member");
        assert!(b.members.is_empty());
        // One first-choice vote each: the leader's order breaks the tie.
        assert_eq!(a.protocol, "range");
        assert_eq!(b.protocol, "range");
    }

    #[tokio::test]
    async fn members_that_do_not_rejoin_by_the_deadline_are_removed() {
        let mut g = Group::new("g");
        g.members.push(member("a", &["range"]));
        g.members.push(member("b", &["range"]));
        g.prepare_rebalance(Duration::ZERO);
        let ra = join(&mut g, "a");
        g.deadline = Instant::now();
        g.try_complete_join();
        let a = ra.await.unwrap();
        assert_eq!(a.members.len(), 1);
        assert!(g.member("b").is_none());
        assert_eq!(g.generation, 1);
    }

    #[tokio::test]
    async fn a_rebalance_interrupts_pending_syncs() {
        let mut g = Group::new("g");
        g.members.push(member("a", &["range"]));
        g.prepare_rebalance(Duration::ZERO);
        let _ra = join(&mut g, "a");
        g.try_complete_join();
        let (tx, rx) = oneshot::channel();
        g.member_mut("a").unwrap().sync_waiter = Some(tx);
        g.members.push(member("b", &["range"]));
        g.prepare_rebalance(Duration::ZERO);
        assert_eq!(rx.await.unwrap().0, ErrorCode::RebalanceInProgress);
    }

    #[tokio::test]
    async fn a_member_removed_while_joining_is_told_it_is_unknown() {
        let mut g = Group::new("g");
        g.members.push(member("a", &["range"]));
        g.members.push(member("b", &["range"]));
        g.prepare_rebalance(Duration::ZERO);
        let rb = join(&mut g, "b");
        assert!(g.remove_member("b"));
        assert!(!g.remove_member("b"));
        let b = rb.await.unwrap();
        assert_eq!((b.error, b.generation), (ErrorCode::UnknownMemberId, -1));
        // a had not rejoined: the rebalance still waits for it.
        g.try_complete_join();
        assert_eq!(g.phase, Phase::PreparingRebalance);
    }

    #[test]
    fn the_last_member_leaving_empties_the_group() {
        let mut g = Group::new("g");
        g.members.push(member("a", &["range"]));
        g.phase = Phase::Stable;
        g.generation = 3;
        g.remove_member("a");
        assert!(!g.after_departure(Duration::ZERO));
        assert_eq!(g.phase, Phase::Empty);
        assert_eq!(g.generation, 4);
    }
}
