//! A small directed graph of named nodes: its strongly connected components
//! (Tarjan) and the layers of their condensation.

use std::collections::{BTreeMap, BTreeSet};

/// Nodes by name; each edge keeps one example of where it comes from.
#[derive(Debug, Default, Clone)]
pub struct Graph {
    pub nodes: BTreeSet<String>,
    pub edges: BTreeMap<String, BTreeMap<String, String>>,
}

impl Graph {
    pub fn add_node(&mut self, node: &str) {
        self.nodes.insert(node.to_string());
    }

    /// Adds `from → to`; the first `site` given for an edge is kept.
    pub fn add_edge(&mut self, from: &str, to: &str, site: impl FnOnce() -> String) {
        self.add_node(from);
        self.add_node(to);
        self.edges
            .entry(from.to_string())
            .or_default()
            .entry(to.to_string())
            .or_insert_with(site);
    }

    fn targets(&self, node: &str) -> impl Iterator<Item = &String> {
        self.edges.get(node).into_iter().flat_map(BTreeMap::keys)
    }

    /// Where `from → to` comes from, if it is an edge.
    pub fn site(&self, from: &str, to: &str) -> Option<&str> {
        self.edges.get(from)?.get(to).map(String::as_str)
    }

    /// The strongly connected components, each sorted, in name order of
    /// their first node.
    pub fn components(&self) -> Vec<Vec<String>> {
        let mut tarjan = Tarjan {
            graph: self,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            next: 0,
            out: Vec::new(),
        };
        for node in &self.nodes {
            if !tarjan.index.contains_key(node.as_str()) {
                tarjan.visit(node);
            }
        }
        let mut out = tarjan.out;
        for c in &mut out {
            c.sort();
        }
        out.sort();
        out
    }

    /// The components with more than one node: the import circles.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        self.components()
            .into_iter()
            .filter(|c| c.len() > 1)
            .collect()
    }

    /// The components by layer: layer 0 names no other component, and each
    /// component sits one layer above the highest one it names.
    pub fn layers(&self) -> Vec<Vec<Vec<String>>> {
        let components = self.components();
        let of: BTreeMap<&str, usize> = components
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.iter().map(move |n| (n.as_str(), i)))
            .collect();
        let mut layer: Vec<Option<usize>> = vec![None; components.len()];
        fn depth(
            c: usize,
            graph: &Graph,
            components: &[Vec<String>],
            of: &BTreeMap<&str, usize>,
            layer: &mut Vec<Option<usize>>,
        ) -> usize {
            if let Some(l) = layer[c] {
                return l;
            }
            let below: BTreeSet<usize> = components[c]
                .iter()
                .flat_map(|n| graph.targets(n))
                .map(|t| of[t.as_str()])
                .filter(|&d| d != c)
                .collect();
            // The condensation is acyclic, so this ends.
            let l = below
                .into_iter()
                .map(|d| depth(d, graph, components, of, layer) + 1)
                .max()
                .unwrap_or(0);
            layer[c] = Some(l);
            l
        }
        let mut layers: Vec<Vec<Vec<String>>> = Vec::new();
        for c in 0..components.len() {
            let l = depth(c, self, &components, &of, &mut layer);
            if layers.len() <= l {
                layers.resize(l + 1, Vec::new());
            }
            layers[l].push(components[c].clone());
        }
        layers
    }
}

struct Tarjan<'g> {
    graph: &'g Graph,
    index: BTreeMap<&'g str, usize>,
    low: BTreeMap<&'g str, usize>,
    stack: Vec<&'g str>,
    on_stack: BTreeSet<&'g str>,
    next: usize,
    out: Vec<Vec<String>>,
}

impl<'g> Tarjan<'g> {
    fn visit(&mut self, v: &'g str) {
        self.index.insert(v, self.next);
        self.low.insert(v, self.next);
        self.next += 1;
        self.stack.push(v);
        self.on_stack.insert(v);
        for w in self.graph.targets(v) {
            let w = w.as_str();
            if !self.index.contains_key(w) {
                self.visit(w);
                let low = self.low[v].min(self.low[w]);
                self.low.insert(v, low);
            } else if self.on_stack.contains(w) {
                let low = self.low[v].min(self.index[w]);
                self.low.insert(v, low);
            }
        }
        if self.low[v] == self.index[v] {
            let mut component = Vec::new();
            while let Some(w) = self.stack.pop() {
                self.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            self.out.push(component);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &str)]) -> Graph {
        let mut g = Graph::default();
        for (a, b) in edges {
            g.add_edge(a, b, || format!("{a}->{b}"));
        }
        g
    }

    #[test]
    fn circles_are_found_and_layers_stack_the_rest() {
        let g = graph(&[
            ("run", "inbound"),
            ("run", "outbound"),
            ("inbound", "io"),
            ("outbound", "io"),
            ("outbound", "pool"),
            ("pool", "body"),
            ("body", "observe"),
            ("observe", "pool"),
        ]);
        assert_eq!(g.cycles(), [["body", "observe", "pool"]]);
        let layers = g.layers();
        let names: Vec<Vec<String>> = layers
            .iter()
            .map(|l| l.iter().map(|c| c.join("+")).collect())
            .collect();
        assert_eq!(
            names,
            [
                vec!["body+observe+pool", "io"],
                vec!["inbound", "outbound"],
                vec!["run"]
            ]
        );
        assert_eq!(g.site("pool", "body"), Some("pool->body"));
    }

    #[test]
    fn a_graph_without_circles_has_none() {
        let g = graph(&[("a", "b"), ("b", "c"), ("a", "c")]);
        assert!(g.cycles().is_empty());
        assert_eq!(g.layers().len(), 3);
    }
}
