# bash completion for dipus and the names its applets are installed as
# (dcat, dls, dipusd, dipus-local-pipe, …).
#
# Install as /usr/share/bash-completion/completions/dipus (and symlinks to
# it named after the applets, for bash-completion's on-demand loading), or
# source it from ~/.bashrc.
#
# Applet names come from `dipus --list`; services for dcat, dls and
# dipus-service-monitor from `dls -1` (full path, NAME, NAME.HOST and the
# protocol of each). Options follow the argh structs of src/applets/*.rs:
# keep them in step.

# Options per applet (subcommand name): those taking a value, then
# switches. Every applet also takes --help.
_dipus_valued() {
	case $1 in
	bench) echo "--listen --count --connect --bytes --connections --size --seconds" ;;
	daemon) echo "--port --bind --allow --max-conns --ttl --host --hosts --services --mode --group --owner --pidfile" ;;
	discoverer) echo "-t --time" ;;
	exporter) echo "--port --bind --allow --max-conns --user" ;;
	import) echo "--pidfile --mode --group --owner" ;;
	local-pipe | export-pipe) echo "-c --concurrency --mode --group" ;;
	local-proxy | export-proxy) echo "--mode --group" ;;
	ssh-importer) echo "--mode --group" ;;
	esac
}

_dipus_switches() {
	case $1 in
	cat) echo "-v --verbose" ;;
	daemon) echo "--no-discovery" ;;
	discoverer) echo "-w --watch" ;;
	import) echo "-f --foreground" ;;
	ls) echo "-1 --one -f --full -l --long -w --watch" ;;
	monitor) echo "--initial" ;;
	serve) echo "--stdio" ;;
	ssh-importer) echo "--discover" ;;
	esac
	echo "--help"
}

# The subcommand name for any name an applet answers to.
_dipus_canonical() {
	case $1 in
	dcat) echo cat ;;
	dls) echo ls ;;
	dipusd) echo daemon ;;
	dipus-service-monitor) echo monitor ;;
	dipus-*) echo "${1#dipus-}" ;;
	*) echo "$1" ;;
	esac
}

# Selectors for the services present: each service's path as `dls -1`
# prints it, its NAME, its NAME.HOST and its protocol.
_dipus_services() {
	local line file name rest
	dls -1 2>/dev/null | while IFS= read -r line; do
		file=${line##*/}
		name=${file%%.*}
		rest=${file#*.}
		printf '%s\n%s\n%s.%s\n%s\n' "$line" "$name" "$name" "${rest%..*}" "${line%/*}"
	done | sort -u
}

_dipus() {
	local cur prev words cword
	if declare -F _init_completion >/dev/null; then
		_init_completion -n : || return
	else
		words=("${COMP_WORDS[@]}")
		cword=$COMP_CWORD
		cur=${COMP_WORDS[COMP_CWORD]}
		prev=${COMP_WORDS[COMP_CWORD - 1]}
	fi
	local applet first=1
	applet=$(_dipus_canonical "${words[0]##*/}")
	if [[ $applet == dipus ]]; then
		if ((cword == 1)); then
			COMPREPLY=($(compgen -W "$(dipus --list 2>/dev/null) --help --list --version" -- "$cur"))
			return
		fi
		applet=$(_dipus_canonical "${words[1]}")
		first=2
	fi
	local valued
	valued=" $(_dipus_valued "$applet") "

	# The value of an option.
	if [[ $valued == *" $prev "* ]]; then
		case $prev in
		--services | --hosts | --pidfile | --listen) COMPREPLY=($(compgen -f -- "$cur")) ;;
		--group) COMPREPLY=($(compgen -g -- "$cur")) ;;
		--owner | --user) COMPREPLY=($(compgen -u -- "$cur")) ;;
		--host) COMPREPLY=($(compgen -W "sep://" -- "$cur")) ;;
		--mode) COMPREPLY=($(compgen -W "0600 0640 0660 0666" -- "$cur")) ;;
		esac
		return
	fi
	if [[ $cur == -* ]]; then
		COMPREPLY=($(compgen -W "$valued $(_dipus_switches "$applet")" -- "$cur"))
		return
	fi

	# Which positional argument this is.
	local positional=0 i
	for ((i = first; i < cword; i++)); do
		if [[ $valued == *" ${words[i]} "* ]]; then
			((i++))
		elif [[ ${words[i]} != -* ]]; then
			((positional++))
		fi
	done
	local IFS=$'\n'
	case $applet in
	cat)
		if ((positional == 0)); then
			COMPREPLY=($(compgen -W "$(_dipus_services)" -- "$cur"))
		else
			COMPREPLY=($(compgen -f -- "$cur"))
		fi
		;;
	ls | monitor) COMPREPLY=($(compgen -W "$(_dipus_services)" -- "$cur")) ;;
	local-pipe | export-pipe) ((positional == 0)) && COMPREPLY=($(compgen -c -- "$cur")) ;;
	local-proxy | export-proxy) ((positional == 0)) && COMPREPLY=($(compgen -f -- "$cur")) ;;
	import) COMPREPLY=($(compgen -W $'sep://\nssh://' -- "$cur")) ;;
	ssh-importer) COMPREPLY=($(compgen -A hostname -- "$cur")) ;;
	bench) ((positional == 0)) && COMPREPLY=($(compgen -W $'sink\nsource\necho\nsend\nrecv\nrr\nconnect' -- "$cur")) ;;
	esac
}

complete -F _dipus dipus dcat dls dipusd dipus-local-pipe dipus-export-pipe dipus-local-proxy dipus-export-proxy \
	dipus-import dipus-exporter dipus-discoverer dipus-service-monitor dipus-ssh-importer
