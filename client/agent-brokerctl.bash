# SPDX-License-Identifier: MIT
# bash completion for agent-brokerctl
_agent_brokerctl()
{
        local cur prev words cword
        COMPREPLY=()
        if declare -F _init_completion >/dev/null; then
                _init_completion || return # (bash-completion handled it, e.g. a redirection)
        else
                cur=${COMP_WORDS[COMP_CWORD]}
                prev=${COMP_WORDS[COMP_CWORD-1]}
                words=("${COMP_WORDS[@]}")
                cword=$COMP_CWORD
        fi
        local commands="token exec keys status whoami policy keygen authenticate introspect attenuate revoke sessions audit review coverage call"
        local global="--socket --admin-socket --timeout --help --version"
        # options followed by a value: a file name, or something only the user knows
        local fileopts=" --socket --admin-socket --out --file --key --keys --policy --pam-dir "
        local valopts=" --timeout --ttl --max-auth-age --overlap --unused-days --audience --scope --task --env --jti --session --sid --token --agent --before --since --event --user "
        local methods="io.agentbroker.IssueToken io.agentbroker.Attenuate io.agentbroker.Introspect io.agentbroker.Revoke
                io.agentbroker.Authenticate io.agentbroker.WhoAmI io.agentbroker.GetKeys io.agentbroker.ListSessions
                io.agentbroker.admin.ReloadPolicy io.agentbroker.admin.ShowPolicy io.agentbroker.admin.Revoke
                io.agentbroker.admin.ListSessions io.agentbroker.admin.Introspect io.agentbroker.admin.GetUsage
                io.agentbroker.admin.ReadAudit io.agentbroker.admin.RotateKey io.agentbroker.admin.ListKeys
                org.varlink.service.GetInfo org.varlink.service.GetInterfaceDescription"
        local i cmd="" cmdi=0 sub="" dashdash=0
        for ((i = 1; i < cword; i++)); do
                if [[ $cmd == exec && ${words[i]} == -- ]]; then
                        dashdash=$i
                        break
                fi
                if [[ $fileopts$valopts == *" ${words[i]} "* ]]; then
                        ((i++)) # its value
                        continue
                fi
                case ${words[i]} in
                -*) ;;
                *)
                        if [[ -z $cmd ]]; then
                                cmd=${words[i]}
                                cmdi=$i
                        elif [[ -z $sub ]]; then
                                sub=${words[i]}
                        fi ;;
                esac
        done

        # exec ... -- CMD ARGS: complete CMD, then as CMD's own completion would
        if ((dashdash)); then
                if declare -F _command_offset >/dev/null; then
                        _command_offset $((dashdash + 1))
                elif ((cword == dashdash + 1)); then
                        COMPREPLY=($(compgen -c -- "$cur"))
                else
                        COMPREPLY=($(compgen -f -- "$cur"))
                fi
                return
        fi

        # a value is expected: files, or nothing (never more flags)
        if [[ $fileopts == *" $prev "* ]]; then
                COMPREPLY=($(compgen -f -- "$cur"))
                return
        fi
        if [[ $valopts == *" $prev "* ]]; then
                COMPREPLY=()
                return
        fi

        local first=false # the word right after the command (where subcommands go)
        ((cword == cmdi + 1)) && first=true
        local w=""
        case $cmd in
        "") w="$commands $global" ;;
        token) w="--audience --scope --ttl --task --json --out --refresh" ;;
        exec) w="--audience --scope --ttl --task --env --" ;;
        keys)
                case $sub in
                "") w="--jwks --json --out"; $first && w="list rotate $w" ;;
                list) w="--json" ;;
                rotate) w="--overlap --force --json" ;;
                esac ;;
        status|whoami|authenticate) w="--json" ;;
        policy)
                case $sub in
                "") $first && w="check show reload sign" ;;
                check) # options come before the first file name
                        COMPREPLY=($(compgen -f -- "$cur"))
                        ((cword == cmdi + 2)) && w="--json --" ;;
                sign) COMPREPLY=($(compgen -f -- "$cur")); w="--key --json" ;;
                reload|show) w="--json" ;;
                esac ;;
        keygen) w="--out --json" ;;
        introspect) w="--audience --scope --max-auth-age --user --json" ;;
        attenuate) w="--audience --scope --ttl --task --json" ;;
        revoke) w="--jti --session --token --agent --before --json" ;;
        sessions) w="--agent --json" ;;
        audit)
                if [[ $sub == verify ]]; then
                        COMPREPLY=($(compgen -f -- "$cur"))
                        w="--file --keys --json"
                else
                        w="--since --agent --event --json --file"
                        $first && w="verify $w"
                fi ;;
        review) w="--json --csv --unused-days --policy" ;;
        coverage) w="--pam-dir --policy --json" ;;
        call) if [[ -z $sub ]]; then w="--admin --json $methods"; else w="--json"; fi ;;
        esac
        [[ -n $w ]] && COMPREPLY+=($(compgen -W "$w" -- "$cur"))
        return 0
}
complete -F _agent_brokerctl agent-brokerctl
