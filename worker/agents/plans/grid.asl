// gymbus: the default BDI plans for grid worlds (FrozenLake, CliffWalking).
//
// The agent posts !decide at its decision points: the start of an episode, and whenever it
// steps onto or off its cached route. A plan for +!decide intends one of three ways to act
// until the next decision point:
//   .follow_route  the action the cached route took in this cell
//   .explore       the Q-learner, epsilon-greedy (it learns from every step in any case)
//   .exploit       the Q-learner, greedy
// After the goal it posts !goal_reached, after a hole (or the cliff) !fell_in_hole(Row, Col);
// there .cache_route keeps this episode's path as the route and .drop_route forgets it.
//
// Beliefs the agent keeps up to date: pos(Row, Col), state(S), goal(Row, Col),
// hole(Row, Col) for every hole found, last_reward(X), route_action(A) while the cell is on
// the route, route_cached, route_return(X), route_drops(N), episode(N), episode_return(X) (at
// !goal_reached), explore_episode (this episode explores: probability epsilon), evaluating
// (an evaluation run) and intending(Way) (the way it acts now).

// Routes assume that moves go where they are meant to. Each route that leads into a hole is
// dropped; after this many, routes are no longer trusted (the ice is slippery) and the
// Q-learner decides alone.
max_route_drops(3).

routes_trusted :- route_drops(D) & max_route_drops(M) & D < M.

@follow_route
+!decide : route_action(_) & routes_trusted & not explore_episode <- .follow_route.

@exploit
+!decide : evaluating <- .exploit.

@explore
+!decide <- .explore.

// a successful episode becomes the route, or replaces one that earned less
@cache_route
+!goal_reached : routes_trusted & not route_cached <- .cache_route.

@better_route
+!goal_reached : routes_trusted & episode_return(R) & route_return(B) & R > B <- .cache_route.

// the route led into a hole: drop it
@drop_route
+!fell_in_hole(_, _) : intending(follow_route) <- .drop_route.
